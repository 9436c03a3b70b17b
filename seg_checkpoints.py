"""Segmentation checkpoints from PyTorch: unilm's mmseg files and transformers' BeitForSemanticSegmentation files,
read into BeitUperNet's Paddle state dict (load_seg_weights.py is the command), and transformers' model as the
reference that -check and the tests compare with.

unilm's layout (``state_dict`` of mmseg 0.11's EncoderDecoder) already has our names. transformers' layout is the
one its files hold (``save_pretrained`` writes it, the hub's ``microsoft/beit-*-finetuned-ade-*`` have it):
``beit.encoder.layer.N.attention.attention.query`` ..., ``fpn1.0``, ``decode_head.classifier``; transformers 5
renames it on loading to its in-memory names, which files do not hold and which are not read here.

transformers counts ``out_indices`` differently from unilm: its forward takes ``hidden_states[i - 1]`` for each
``i``, where ``hidden_states[0]`` is the embedding output, so ``i`` selects block ``i - 2`` (0-based). The released
configs' ``[3, 5, 7, 11]`` select blocks 1, 3, 5, 9, not unilm's 3, 5, 7, 11; the reference here is given unilm's
blocks (``i = block + 2``, set past transformers' check, which allows at most ``i = depth``). Its features are
those hidden states, before its final layernorm (the identity with mean pooling anyway), as unilm's. Its layers
resample their bias tables on every forward, bilinearly, from ``config.image_size``'s grid to the input's (and, with
``interpolate_pos_encoding``, the bias matrix too); the reference is built at the crop, where that resampling is the
identity, while our model resamples a checkpoint's tables once, at loading, with unilm's method.
"""
import re
import tempfile
from pathlib import Path

import numpy as np
import paddle.nn as nn

from beit import CheckpointMismatchError, adapt_state_dict
from beit_seg import BACKBONE_PREFIX, BeitUperNet
from torch_checkpoint import ConversionError, linear_weight_names, to_paddle_layout

HEAD_PREFIXES = ('decode_head.', 'auxiliary_head.')
_HF_BLOCK = r'^beit\.encoder\.layer\.(\d+)\.'
_OURS_BLOCK = r'backbone.blocks.\1.'
# transformers' file names -> ours (PyTorch layout), as regular expressions; q, k and v are merged apart.
_HF_RENAMES = (
    (r'^beit\.embeddings\.cls_token$', 'backbone.cls_token'),
    (r'^beit\.embeddings\.patch_embeddings\.projection\.', 'backbone.patch_embed.proj.'),
    (r'^beit\.embeddings\.position_embeddings$', 'backbone.pos_embed'),
    (r'^beit\.encoder\.relative_position_bias\.', 'backbone.rel_pos_bias.'),
    (_HF_BLOCK + r'attention\.attention\.relative_position_bias\.', _OURS_BLOCK + 'attn.'),
    (_HF_BLOCK + r'attention\.output\.dense\.', _OURS_BLOCK + 'attn.proj.'),
    (_HF_BLOCK + r'intermediate\.dense\.', _OURS_BLOCK + 'mlp.fc1.'),
    (_HF_BLOCK + r'output\.dense\.', _OURS_BLOCK + 'mlp.fc2.'),
    (_HF_BLOCK + r'layernorm_before\.', _OURS_BLOCK + 'norm1.'),
    (_HF_BLOCK + r'layernorm_after\.', _OURS_BLOCK + 'norm2.'),
    (_HF_BLOCK + r'lambda_(\d)$', _OURS_BLOCK + r'gamma_\2'),
    (r'^(fpn\d)\.', r'backbone.\1.'),
    (r'^(decode_head|auxiliary_head)\.classifier\.', r'\1.conv_seg.'),
    (r'^(decode_head|auxiliary_head)\.', r'\1.'),
)
_HF_QKV = re.compile(_HF_BLOCK + r'attention\.attention\.(query|key|value)\.(weight|bias)$')
_HF_UNUSED = re.compile(r'^beit\.(embeddings\.mask_token$|layernorm\.|pooler\.)')  # no place in a segmentor
_BN_STATS = (('.running_mean', '._mean'), ('.running_var', '._variance'))
_DROPPED_SUFFIXES = ('.num_batches_tracked', 'relative_position_index')


def detect_layout(state_dict: dict, source: str) -> str:
    """'unilm' or 'transformers'; any other file is refused, naming what it holds."""
    names = list(state_dict)
    has_heads = any(name.startswith('decode_head.') for name in names)
    if has_heads and any(name.startswith(BACKBONE_PREFIX) for name in names):
        return 'unilm'
    if has_heads and any(name.startswith('beit.') for name in names):
        return 'transformers'
    raise ConversionError(
        f'{source}: not a BEiT segmentation checkpoint: neither unilm\'s mmseg layout (backbone.*, decode_head.*, '
        f'auxiliary_head.*) nor transformers\' BeitForSemanticSegmentation (beit.*, fpn1.*, decode_head.*); it holds '
        f'{", ".join(names[:4])}{" ..." if len(names) > 4 else ""} (a classification or pre-training checkpoint '
        'starts a segmentation run through -pretrained instead)')


def transformers_to_unilm(state_dict: dict) -> tuple[dict, list]:
    """transformers' file names -> unilm's (PyTorch layout): q/k/v merged into ``qkv`` with unilm's ``q_bias`` and
    ``v_bias`` (k has none). Returns the dict and notes on what was dropped."""
    converted, qkv, dropped = {}, {}, []
    for name, value in state_dict.items():
        match = _HF_QKV.match(name)
        if match:
            qkv.setdefault(int(match.group(1)), {})[f'{match.group(2)}.{match.group(3)}'] = value
        elif _HF_UNUSED.match(name):
            dropped.append(name)
        else:
            converted[_rename(name, _HF_RENAMES)] = value
    for block, parts in sorted(qkv.items()):
        prefix = f'backbone.blocks.{block}.attn.'
        try:
            converted[prefix + 'qkv.weight'] = np.concatenate(
                [parts['query.weight'], parts['key.weight'], parts['value.weight']])
        except KeyError as err:
            raise ConversionError(f'block {block}: {err.args[0]} is missing from the checkpoint') from None
        for ours, theirs in (('q_bias', 'query.bias'), ('v_bias', 'value.bias')):
            if theirs in parts:
                converted[prefix + ours] = parts[theirs]
    return converted, [f'dropped {", ".join(dropped)}: no place in the segmentor'] if dropped else []


def _rename(name: str, renames) -> str:
    for pattern, replacement in renames:
        new, count = re.subn(pattern, replacement, name)
        if count:
            return new
    return name


def _paddle_names(state_dict: dict) -> dict:
    """BatchNorm statistics renamed to Paddle's, torch's step counters and the constant index buffers dropped."""
    renamed = {}
    for name, value in state_dict.items():
        if name.endswith(_DROPPED_SUFFIXES):
            continue
        for torch_suffix, paddle_suffix in _BN_STATS:
            if name.endswith(torch_suffix):
                name = name[:-len(torch_suffix)] + paddle_suffix
        renamed[name] = value
    return renamed


def convert_state_dict(torch_state_dict: dict, model: BeitUperNet, source: str,
                       rel_pos_interp: str = 'cubic') -> tuple[dict, list, str]:
    """A unilm or transformers checkpoint (name -> numpy array, PyTorch layout) -> (``model``'s Paddle state dict,
    notes, layout). Every tensor of the model must come from the file; the backbone's bias tables are resampled
    when the file was trained at another crop (a note says so); heads must fit as they are."""
    layout = detect_layout(torch_state_dict, source)
    notes = []
    if layout == 'transformers':
        torch_state_dict, notes = transformers_to_unilm(torch_state_dict)
    state = to_paddle_layout(_paddle_names(torch_state_dict), model)
    backbone = {name[len(BACKBONE_PREFIX):]: value for name, value in state.items() if name.startswith(BACKBONE_PREFIX)}
    heads = {name: value for name, value in state.items() if name.startswith(HEAD_PREFIXES)}
    others = sorted(set(state) - set(heads) - {BACKBONE_PREFIX + name for name in backbone})
    if others:
        raise CheckpointMismatchError(f'{source}: {len(others)} tensors are neither backbone nor head tensors, e.g. '
                                      f'{", ".join(others[:5])}')
    try:
        fitted, backbone_notes = adapt_state_dict(backbone, model.backbone, rel_pos_interp, complete=True)
    except CheckpointMismatchError as err:
        raise CheckpointMismatchError(f'{source}: backbone: {err}') from None
    _check_heads(heads, model, source)
    state = {**{BACKBONE_PREFIX + name: value for name, value in fitted.items()}, **heads}
    return state, notes + backbone_notes, layout


def _check_heads(heads: dict, model: BeitUperNet, source: str) -> None:
    target = {name: tuple(t.shape) for name, t in model.state_dict().items() if name.startswith(HEAD_PREFIXES)}
    missing = sorted(set(target) - set(heads))
    unexpected = sorted(set(heads) - set(target))
    if missing or unexpected:
        raise CheckpointMismatchError(
            f'{source}: the heads do not fit the model (SEG.* keys of the config): '
            + '; '.join(part for part in (f'missing {", ".join(missing[:4])}' if missing else '',
                                          f'not in the model {", ".join(unexpected[:4])}' if unexpected else '')
                        if part))
    for name, shape in target.items():
        if heads[name].shape != shape:
            raise CheckpointMismatchError(
                f'{source}: {name} is {list(heads[name].shape)} in the checkpoint, {list(shape)} in the model '
                '(SEG.NUM_CLASSES, SEG.CHANNELS, SEG.AUX_CHANNELS or SEG.POOL_SCALES differ)')


# ---- transformers' model as the reference (needs torch and transformers) ----

def unilm_to_transformers(state_dict: dict, model: nn.Layer) -> dict:
    """Our Paddle state dict of ``model`` -> transformers' file layout (PyTorch): the inverse of convert_state_dict
    at the model's own grid. Without q/v biases (MODEL.QKV_BIAS off) transformers' are zeros."""
    linears = linear_weight_names(model)
    converted = {}
    for name, value in state_dict.items():
        value = np.asarray(value)
        if name in linears:
            value = value.T
        for torch_suffix, paddle_suffix in _BN_STATS:
            if name.endswith(paddle_suffix):
                name = name[:-len(paddle_suffix)] + torch_suffix
        for hf_name, hf_value in _to_transformers_names(name, value).items():
            converted[hf_name] = hf_value
            if hf_name.endswith('.running_mean'):
                converted[hf_name[:-len('running_mean')] + 'num_batches_tracked'] = np.zeros((), np.int64)
    for name in [name for name in converted if name.endswith('.attention.attention.query.weight')]:
        for bias in (name.replace('query.weight', 'query.bias'), name.replace('query.weight', 'value.bias')):
            converted.setdefault(bias, np.zeros(len(converted[name]), np.float32))
    return {name: np.array(value, order='C') for name, value in converted.items()}


_OURS_TO_HF = (
    (r'^backbone\.cls_token$', 'beit.embeddings.cls_token'),
    (r'^backbone\.patch_embed\.proj\.', 'beit.embeddings.patch_embeddings.projection.'),
    (r'^backbone\.pos_embed$', 'beit.embeddings.position_embeddings'),
    (r'^backbone\.rel_pos_bias\.', 'beit.encoder.relative_position_bias.'),
    (r'^backbone\.blocks\.(\d+)\.attn\.relative_position_bias_table$',
     r'beit.encoder.layer.\1.attention.attention.relative_position_bias.relative_position_bias_table'),
    (r'^backbone\.blocks\.(\d+)\.attn\.proj\.', r'beit.encoder.layer.\1.attention.output.dense.'),
    (r'^backbone\.blocks\.(\d+)\.mlp\.fc1\.', r'beit.encoder.layer.\1.intermediate.dense.'),
    (r'^backbone\.blocks\.(\d+)\.mlp\.fc2\.', r'beit.encoder.layer.\1.output.dense.'),
    (r'^backbone\.blocks\.(\d+)\.norm1\.', r'beit.encoder.layer.\1.layernorm_before.'),
    (r'^backbone\.blocks\.(\d+)\.norm2\.', r'beit.encoder.layer.\1.layernorm_after.'),
    (r'^backbone\.blocks\.(\d+)\.gamma_(\d)$', r'beit.encoder.layer.\1.lambda_\2'),
    (r'^backbone\.(fpn\d)\.', r'\1.'),
    (r'^(decode_head|auxiliary_head)\.conv_seg\.', r'\1.classifier.'),
)


def _to_transformers_names(name: str, value: np.ndarray) -> dict:
    qkv = re.match(r'^backbone\.blocks\.(\d+)\.attn\.(qkv\.weight|q_bias|v_bias)$', name)
    if not qkv:
        return {_rename(name, _OURS_TO_HF): value}
    prefix = f'beit.encoder.layer.{qkv.group(1)}.attention.attention.'
    if qkv.group(2) == 'qkv.weight':
        query, key, val = np.split(value, 3)
        return {prefix + 'query.weight': query, prefix + 'key.weight': key, prefix + 'value.weight': val}
    return {prefix + ('query.bias' if qkv.group(2) == 'q_bias' else 'value.bias'): value}


def transformers_config(config):
    """transformers' BeitConfig for the segmentor of ``config`` (no dropout or drop path: a reference for eval; its
    loss weighs the auxiliary head and ignores labels as ours)."""
    from transformers import BeitConfig
    m, seg = config.MODEL, config.SEG
    return BeitConfig(
        image_size=config.DATA.IMAGE_SIZE, patch_size=m.PATCH_SIZE, num_channels=config.DATA.IMAGE_CHANNELS,
        hidden_size=m.EMBED_DIM, num_hidden_layers=m.DEPTH, num_attention_heads=m.NUM_HEADS,
        intermediate_size=int(m.EMBED_DIM * m.MLP_RATIO), hidden_act='gelu', layer_norm_eps=1e-6,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, drop_path_rate=0.0,
        use_absolute_position_embeddings=m.USE_ABS_POS_EMB, use_relative_position_bias=m.USE_REL_POS_BIAS,
        use_shared_relative_position_bias=m.USE_SHARED_REL_POS_BIAS, layer_scale_init_value=m.INIT_VALUES or 0.0,
        use_mean_pooling=True, pool_scales=list(seg.POOL_SCALES), auxiliary_channels=seg.AUX_CHANNELS,
        num_labels=seg.NUM_CLASSES, out_indices=list(range(1, 5)), auxiliary_loss_weight=seg.AUX_LOSS_WEIGHT,
        semantic_loss_ignore_index=seg.IGNORE_INDEX)


def transformers_model(config, hf_state_dict: dict):
    """transformers' BeitForSemanticSegmentation (eval mode) loaded through its own from_pretrained from a folder
    holding ``hf_state_dict`` (file layout) and the config, then pointed at unilm's blocks (see the module doc)."""
    from safetensors.numpy import save_file
    from transformers import BeitForSemanticSegmentation
    check_transformers_can_express(config)
    with tempfile.TemporaryDirectory() as folder:
        transformers_config(config).save_pretrained(folder)
        save_file({name: np.array(value, order='C') for name, value in hf_state_dict.items()},
                  str(Path(folder) / 'model.safetensors'), metadata={'format': 'pt'})
        reference = BeitForSemanticSegmentation.from_pretrained(folder).eval()
    return on_unilm_blocks(reference, config)


def random_transformers_model(config):
    """transformers' BeitForSemanticSegmentation of ``config``'s shape with its own random init, pointed at unilm's
    blocks (benchmark.py's reference)."""
    from transformers import BeitForSemanticSegmentation
    check_transformers_can_express(config)
    return on_unilm_blocks(BeitForSemanticSegmentation(transformers_config(config)), config)


def check_transformers_can_express(config) -> None:
    if config.SEG.CHANNELS != config.MODEL.EMBED_DIM:
        raise ConversionError(f'transformers\' UperHead is as wide as the encoder: it cannot stand for SEG.CHANNELS '
                              f'{config.SEG.CHANNELS} with MODEL.EMBED_DIM {config.MODEL.EMBED_DIM}')


def on_unilm_blocks(reference, config):
    """``reference`` taking its features from the blocks SEG.OUT_INDICES as unilm counts them (see the module doc)."""
    reference.config._out_indices = [block + 2 for block in config.SEG.OUT_INDICES]
    return reference


def transformers_logits(reference, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(main, auxiliary) logits of transformers' model in eval mode (the auxiliary ones from its head's output)."""
    import torch
    captured = []
    hook = reference.auxiliary_head.register_forward_hook(lambda module, args, output: captured.append(output))
    try:
        with torch.no_grad():
            main = reference(pixel_values=torch.from_numpy(images)).logits
    finally:
        hook.remove()
    return main.numpy(), captured[0].numpy()
