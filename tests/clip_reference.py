"""OpenAI's CLIP (the clip package's model.py, random weights) as the reference of clip_teacher.py, the files
OpenAI's weights come in, and unilm's CLIP target.

Facts followed (unilm's beit2/modeling_vqkd.py): ``VQKD.forward`` maps a batch in [0, 1] to [-1, 1]
(x * 255 / 127.5 - 1), ``ScalingLayerForClip`` maps it back ((x + 1) * 127.5, clamped to [0, 255], / 255) and
normalises with CLIP's mean and std; the target is ``encode_image(x, return_all_tokens=True) @ visual.proj``, where
unilm's copy of CLIP returns ``ln_post`` of every token but the class token. OpenAI's forward applies ``ln_post`` and
``proj`` to the class token only, so the tokens are caught after the blocks by a hook, and the class token's row is
checked against OpenAI's own output. OpenAI's released ViT-B-16.pt is a TorchScript archive with fp16 weights and
the tensors ``input_resolution``, ``context_length`` and ``vocab_size``; ``clip.load(jit=False)`` on CPU gives the
same values in fp32.
"""
import copy
import warnings

import numpy as np
import torch

from load_clip_weights import openai_clip_model

TINY = {'input_resolution': 32, 'patch_size': 8, 'width': 128, 'layers': 2, 'heads': 2, 'output_dim': 48}
VIT_B_16 = {'input_resolution': 224, 'patch_size': 16, 'width': 768, 'layers': 12, 'heads': 12, 'output_dim': 512}
_TEXT = {'context_length': 8, 'vocab_size': 50, 'transformer_width': 64, 'transformer_heads': 1,
         'transformer_layers': 1}
MEAN = (0.48145466, 0.4578275, 0.40821073)
STD = (0.26862954, 0.26130258, 0.27577711)


def openai_clip(size: dict, seed: int = 0) -> torch.nn.Module:
    """OpenAI's CLIP (a small text encoder) with the ViT of ``size`` (heads must be width // 64, as OpenAI builds
    it), every parameter moved off its initial value, so a misplaced LayerNorm or bias shows."""
    clip = openai_clip_model()
    torch.manual_seed(seed)
    model = clip.CLIP(embed_dim=size['output_dim'], image_resolution=size['input_resolution'],
                      vision_layers=size['layers'], vision_width=size['width'], vision_patch_size=size['patch_size'],
                      **_TEXT)
    assert model.visual.transformer.resblocks[0].attn.num_heads == size['heads']
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.startswith('visual.') and ('ln_' in name or name.endswith('bias')):
                param.add_(0.1 * torch.randn_like(param))
    return model.eval()


def save_state_dict(model: torch.nn.Module, path, *, half: bool = False):
    """``torch.save(model.state_dict())``, as clip.load(jit=False) gives it on CPU (fp32), or in fp16."""
    state_dict = {name: value.half() if half and value.is_floating_point() else value
                  for name, value in model.state_dict().items()}
    torch.save(state_dict, path)
    return path


def save_torchscript(model: torch.nn.Module, path):
    """A TorchScript archive like OpenAI's release: the traced CLIP, its weights in fp16 (as the clip package's
    convert_weights leaves them), and the settings as tensors."""
    size = model.visual.input_resolution
    traced_model = copy.deepcopy(model)
    for name, value in (('input_resolution', size), ('context_length', _TEXT['context_length']),
                        ('vocab_size', _TEXT['vocab_size'])):
        if hasattr(traced_model, name):  # CLIP keeps two of them as plain ints
            delattr(traced_model, name)
        traced_model.register_buffer(name, torch.tensor(value))
    half = copy.deepcopy(traced_model)
    openai_clip_model().convert_weights(half)  # traced in fp32 (CPU), then stored in the dtypes it sets
    with warnings.catch_warnings():
        warnings.simplefilter('ignore', FutureWarning)  # torch.jit is deprecated; OpenAI's file is TorchScript
        warnings.simplefilter('ignore', torch.jit.TracerWarning)  # MultiheadAttention's shape checks
        traced = torch.jit.trace(traced_model.eval(), (torch.rand(1, 3, size, size),
                                                       torch.randint(0, _TEXT['vocab_size'], (1, 8))))
        with torch.no_grad():
            for name, param in traced.named_parameters():
                param.data = param.data.to(half.get_parameter(name).dtype)
        torch.jit.save(traced, str(path))
    return path


def unilm_target(model: torch.nn.Module, images: np.ndarray) -> np.ndarray:
    """unilm's CLIP regression target [B, N, output_dim] for ``images`` [B, 3, R, R] in [0, 1]. Values a little
    outside (a bicubic overshoot) are clamped by the scaling layer; unilm's pre_process would take a batch whose
    max exceeds 1 for 0-255 pixels, which the teacher's input never is, so that branch is not followed."""
    x = torch.from_numpy(images) * 255.0 / 127.5 - 1.0
    x = ((x + 1.0) * 127.5).clamp(0, 255.0) / 255.0
    x = (x - torch.tensor(MEAN).reshape(1, 3, 1, 1)) / torch.tensor(STD).reshape(1, 3, 1, 1)
    caught = []
    hook = model.visual.transformer.register_forward_hook(lambda module, args, output: caught.append(output))
    try:
        with torch.no_grad():
            embedding = model.encode_image(x)
    finally:
        hook.remove()
    with torch.no_grad():
        tokens = model.visual.ln_post(caught[0].permute(1, 0, 2)) @ model.visual.proj
    np.testing.assert_allclose(tokens[:, 0].numpy(), embedding.numpy(), rtol=0, atol=1e-5)  # the same rows
    return tokens[:, 1:].numpy()


def random_images(count: int, size: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).random((count, 3, size, size), dtype=np.float32)
