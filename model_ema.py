"""Exponential moving average of a model's weights, evaluated and saved next to the model.

Create it only after pretrained or resumed weights are in the model: the average starts from the weights it
copies. Only floating-point state is averaged; integer tensors (a checkpoint's counters, the relative-position
index, which is a constant) are left as they were copied.
"""
import copy

import paddle
import paddle.nn as nn


class ModelEma:
    """ema = decay * ema + (1 - decay) * model, per optimizer step, in float32 whatever the model's dtype."""

    def __init__(self, model: nn.Layer, decay: float):
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f'EMA decay must lie in [0, 1], got {decay}')
        self.decay = decay
        self.module = copy.deepcopy(model)
        self.module.eval()
        for param in self.module.parameters():
            param.stop_gradient = True

    def averaged_tensors(self) -> dict:
        """name -> tensor of the EMA state that update() averages (the floating-point state-dict entries)."""
        return {name: tensor for name, tensor in self.module.state_dict().items() if tensor.is_floating_point()}

    @paddle.no_grad()
    def update(self, weights: dict) -> None:
        """Average in ``weights``, the model's state dict (under AMP O2: optim.float32_weights, the master copy)."""
        for name, average in self.averaged_tensors().items():
            average.set_value(average * self.decay + weights[name].astype(average.dtype) * (1.0 - self.decay))

    def state_dict(self) -> dict:
        return self.module.state_dict()

    def set_state_dict(self, state_dict: dict) -> None:
        self.module.set_state_dict(state_dict)
