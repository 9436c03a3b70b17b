"""The fine-tuning task's objective: top-k counts and the training and evaluation counts of a batch."""
import numpy as np
import paddle

from task_finetune import topk_correct


def test_topk_correct_counts_rows_with_the_label_among_the_k_best():
    logits = paddle.to_tensor([[0.0, 5, 4, 3, 2, 1, -1], [9, 8, 7, 6, 5, 4, 3], [1, 2, 3, 4, 5, 6, 7]])
    labels = paddle.to_tensor([1, 5, 0])
    np.testing.assert_array_equal(topk_correct(logits, labels).numpy(), [1, 1])
