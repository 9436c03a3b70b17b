"""Convert OpenAI's DALL-E dVAE encoder to the Paddle state dict that dalle_tokenizer.build_tokenizer loads.

    python load_dalle_weights.py -src encoder.pkl -dst dalle_encoder.pdparams

OpenAI's encoder.pkl is a ``torch.save`` of the whole dall_e Encoder module. It is read with torch's
weights-only unpickler, which rebuilds the dall_e classes as plain torch modules: neither the dall_e package
nor any code from the file runs (torch is needed). A state-dict file (``torch.save(encoder.state_dict())``, or
.safetensors) converts as well. Names and layouts carry over unchanged. The encoder's size (n_hid, blocks per
group, vocabulary, input channels) is read from the tensor shapes, here to check the file and again by
build_tokenizer, so the output holds the tensors only. Nothing is written unless the whole file fits.
"""
import argparse
import sys

import paddle

from dalle_tokenizer import Encoder, check_state_dict_fits, encoder_kwargs_from_state_dict
from errors import EXIT_BAD_INPUT, BadInputError
from torch_checkpoint import read_checkpoint, to_paddle_layout
from utils import save_atomically

# The classes encoder.pkl pickles, and those of decoder.pkl, so that a decoder is named as such when refused.
OPENAI_MODULE_CLASSES = (
    'dall_e.encoder.Encoder', 'dall_e.encoder.EncoderBlock', 'dall_e.utils.Conv2d',
    'dall_e.decoder.Decoder', 'dall_e.decoder.DecoderBlock', 'torch.nn.modules.upsampling.Upsample',
    'torch.nn.modules.container.Sequential', 'torch.nn.modules.activation.ReLU',
    'torch.nn.modules.pooling.MaxPool2d', 'torch.nn.modules.linear.Identity')


def convert_file(src: str, dst: str) -> dict:
    """Write the encoder in ``src`` to ``dst`` atomically; returns its Encoder arguments."""
    tensors = read_checkpoint(src, module_classes=OPENAI_MODULE_CLASSES)
    encoder_kwargs = encoder_kwargs_from_state_dict(tensors, src)
    with paddle.LazyGuard():  # the shapes are all that is needed: no random init of 54M parameters
        model = Encoder(**encoder_kwargs)
    check_state_dict_fits(tensors, model, src)
    state_dict = to_paddle_layout(tensors, model)
    save_atomically({name: paddle.to_tensor(value) for name, value in state_dict.items()}, dst)
    return encoder_kwargs


def main(argv=None) -> int:
    parser = argparse.ArgumentParser('Convert OpenAI\'s DALL-E encoder (encoder.pkl) to Paddle')
    parser.add_argument('-src', required=True, help='encoder.pkl, or a state dict of the dall_e Encoder')
    parser.add_argument('-dst', required=True, help='output .pdparams')
    args = parser.parse_args(argv)
    try:
        encoder_kwargs = convert_file(args.src, args.dst)
    except BadInputError as err:
        print(f'error: {err}', file=sys.stderr)
        return EXIT_BAD_INPUT
    settings = ', '.join(f'{key}={value}' for key, value in encoder_kwargs.items())
    print(f'wrote the DALL-E encoder ({settings}) to {args.dst}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
