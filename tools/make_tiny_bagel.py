"""Writes a tiny randomly initialised BAGEL in the official BAGEL-7B-MoT folder layout, locally.

    python tools/make_tiny_bagel.py OUT_DIR [--seed N]

OUT_DIR gets config.json (model_type bagel, inline llm_config / vit_config for vLLM),
llm_config.json, vit_config.json, ema.safetensors (official key names, written here from the
naming scheme - this tool does not import the model package), ae.safetensors (FLUX VAE in Black
Forest Labs' key names with the real geometry: 16 latent channels, /8, but 32-64 channels and one
res block per level), a byte-level BPE tokenizer trained here with BAGEL's special tokens, a
SigLIP preprocessor config and a generation config. Sizes: LLM hidden 128, 2 MoT layers, 4 heads
of 32 (2 KV heads); ViT hidden 32 on 32x32 images with 8x8 patches (vit_max_num_patch_per_side
4 = image_size / patch_size, which vLLM needs); latent grid up to 8x8 tokens (128 px). About 8 MB,
written in a few seconds.

The ViT depth trap: the official loader builds vit_config.json's num_hidden_layers - 1 layers,
vLLM builds the inline vit_config's count and drops one only when it says 27. So vit_config.json
says 3 and the inline copy says 2: both build the same 2-layer tower.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys

import numpy as np
import torch
from safetensors.torch import save_file

HIDDEN, INTER, LAYERS, HEADS, KV_HEADS = 128, 256, 2, 4, 2  # head_dim 32: the smallest vLLM CPU attention takes
HEAD_DIM = HIDDEN // HEADS
VIT_HIDDEN, VIT_INTER, VIT_LAYERS, VIT_HEADS, VIT_PATCH, VIT_SIDE = 32, 64, 2, 2, 8, 4
MAX_LATENT, LATENT_PATCH, Z = 8, 2, 16
VAE_CH, VAE_MULT, VAE_BLOCKS = 32, (1, 1, 2, 2), 1
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>"]
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
    "{% if m['content'] is string %}{{ m['content'] }}{% else %}{% for c in m['content'] %}"
    "{% if c['type'] in ('image', 'image_url') %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def corpus():
    words = (
        "a an the red green blue yellow purple orange circle square triangle shape shapes two three "
        "left right above below of to is are image picture draw think plan edit make it bigger smaller "
        "user assistant system answer yes no what colour color how many there"
    ).split()
    lines = [" ".join(words[i : i + 7]) for i in range(0, len(words), 3)]
    lines += ["<think> plan the image </think>", "Describe the image.", "What shape is it?"]
    return lines * 20


def make_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<|endoftext|>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=600,
        special_tokens=SPECIALS,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(corpus(), trainer)
    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token="<|endoftext|>",
        additional_special_tokens=SPECIALS[3:],
        model_max_length=4096,
    )
    hf.chat_template = CHAT_TEMPLATE
    return hf


def ema_shapes(vocab: int) -> dict:
    """Official ema.safetensors names -> shapes for the tiny sizes."""
    s = {"language_model.model.embed_tokens.weight": (vocab, HIDDEN)}
    for n in range(LAYERS):
        p = f"language_model.model.layers.{n}."
        for e in ("", "_moe_gen"):
            s[f"{p}self_attn.q_proj{e}.weight"] = (HEADS * HEAD_DIM, HIDDEN)
            s[f"{p}self_attn.q_proj{e}.bias"] = (HEADS * HEAD_DIM,)
            for kv in ("k", "v"):
                s[f"{p}self_attn.{kv}_proj{e}.weight"] = (KV_HEADS * HEAD_DIM, HIDDEN)
                s[f"{p}self_attn.{kv}_proj{e}.bias"] = (KV_HEADS * HEAD_DIM,)
            s[f"{p}self_attn.o_proj{e}.weight"] = (HIDDEN, HEADS * HEAD_DIM)
            s[f"{p}self_attn.q_norm{e}.weight"] = (HEAD_DIM,)
            s[f"{p}self_attn.k_norm{e}.weight"] = (HEAD_DIM,)
            s[f"{p}mlp{e}.gate_proj.weight"] = (INTER, HIDDEN)
            s[f"{p}mlp{e}.up_proj.weight"] = (INTER, HIDDEN)
            s[f"{p}mlp{e}.down_proj.weight"] = (HIDDEN, INTER)
            s[f"{p}input_layernorm{e}.weight"] = (HIDDEN,)
            s[f"{p}post_attention_layernorm{e}.weight"] = (HIDDEN,)
    s["language_model.model.norm.weight"] = (HIDDEN,)
    s["language_model.model.norm_moe_gen.weight"] = (HIDDEN,)
    s["language_model.lm_head.weight"] = (vocab, HIDDEN)
    v = "vit_model.vision_model."
    s[f"{v}embeddings.patch_embedding.weight"] = (VIT_HIDDEN, 3 * VIT_PATCH * VIT_PATCH)  # linear layout
    s[f"{v}embeddings.patch_embedding.bias"] = (VIT_HIDDEN,)
    s[f"{v}embeddings.position_embedding.weight"] = (VIT_SIDE * VIT_SIDE, VIT_HIDDEN)
    for n in range(VIT_LAYERS):
        p = f"{v}encoder.layers.{n}."
        for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
            s[f"{p}self_attn.{proj}.weight"] = (VIT_HIDDEN, VIT_HIDDEN)
            s[f"{p}self_attn.{proj}.bias"] = (VIT_HIDDEN,)
        for ln in ("layer_norm1", "layer_norm2"):
            s[f"{p}{ln}.weight"] = (VIT_HIDDEN,)
            s[f"{p}{ln}.bias"] = (VIT_HIDDEN,)
        s[f"{p}mlp.fc1.weight"], s[f"{p}mlp.fc1.bias"] = (VIT_INTER, VIT_HIDDEN), (VIT_INTER,)
        s[f"{p}mlp.fc2.weight"], s[f"{p}mlp.fc2.bias"] = (VIT_HIDDEN, VIT_INTER), (VIT_HIDDEN,)
    s[f"{v}post_layernorm.weight"], s[f"{v}post_layernorm.bias"] = (VIT_HIDDEN,), (VIT_HIDDEN,)
    s["connector.fc1.weight"], s["connector.fc1.bias"] = (HIDDEN, VIT_HIDDEN), (HIDDEN,)
    s["connector.fc2.weight"], s["connector.fc2.bias"] = (HIDDEN, HIDDEN), (HIDDEN,)
    s["vit_pos_embed.pos_embed"] = (VIT_SIDE * VIT_SIDE, HIDDEN)
    s["time_embedder.mlp.0.weight"], s["time_embedder.mlp.0.bias"] = (HIDDEN, 256), (HIDDEN,)
    s["time_embedder.mlp.2.weight"], s["time_embedder.mlp.2.bias"] = (HIDDEN, HIDDEN), (HIDDEN,)
    lat = LATENT_PATCH * LATENT_PATCH * Z
    s["vae2llm.weight"], s["vae2llm.bias"] = (HIDDEN, lat), (HIDDEN,)
    s["llm2vae.weight"], s["llm2vae.bias"] = (lat, HIDDEN), (lat,)
    s["latent_pos_embed.pos_embed"] = (MAX_LATENT * MAX_LATENT, HIDDEN)
    return s


def ae_shapes() -> dict:
    """Black Forest Labs' autoencoder names (flux/modules/autoencoder.py) -> shapes."""
    s = {}

    def conv(name, cout, cin, k):
        s[f"{name}.weight"], s[f"{name}.bias"] = (cout, cin, k, k), (cout,)

    def norm(name, c):
        s[f"{name}.weight"], s[f"{name}.bias"] = (c,), (c,)

    def resnet(name, cin, cout):
        norm(f"{name}.norm1", cin)
        conv(f"{name}.conv1", cout, cin, 3)
        norm(f"{name}.norm2", cout)
        conv(f"{name}.conv2", cout, cout, 3)
        if cin != cout:
            conv(f"{name}.nin_shortcut", cout, cin, 1)

    def mid(prefix, c):
        resnet(f"{prefix}.mid.block_1", c, c)
        norm(f"{prefix}.mid.attn_1.norm", c)
        for q in ("q", "k", "v", "proj_out"):
            conv(f"{prefix}.mid.attn_1.{q}", c, c, 1)
        resnet(f"{prefix}.mid.block_2", c, c)

    levels = len(VAE_MULT)
    conv("encoder.conv_in", VAE_CH, 3, 3)
    c_in = VAE_CH
    for i, m in enumerate(VAE_MULT):
        c_out = VAE_CH * m
        for j in range(VAE_BLOCKS):
            resnet(f"encoder.down.{i}.block.{j}", c_in, c_out)
            c_in = c_out
        if i != levels - 1:
            conv(f"encoder.down.{i}.downsample.conv", c_in, c_in, 3)
    mid("encoder", c_in)
    norm("encoder.norm_out", c_in)
    conv("encoder.conv_out", 2 * Z, c_in, 3)
    c_in = VAE_CH * VAE_MULT[-1]
    conv("decoder.conv_in", c_in, Z, 3)
    mid("decoder", c_in)
    for i in reversed(range(levels)):
        c_out = VAE_CH * VAE_MULT[i]
        for j in range(VAE_BLOCKS + 1):
            resnet(f"decoder.up.{i}.block.{j}", c_in, c_out)
            c_in = c_out
        if i != 0:
            conv(f"decoder.up.{i}.upsample.conv", c_in, c_in, 3)
    norm("decoder.norm_out", c_in)
    conv("decoder.conv_out", 3, c_in, 3)
    return s


def sincos_2d(dim: int, grid: int) -> np.ndarray:
    """BAGEL's frozen 2D sin-cos table (MAE/DiT): [column half | row half], each [sin | cos]."""

    def one_d(d, pos):
        omega = 1.0 / 10000 ** (np.arange(d // 2, dtype=np.float64) / (d / 2.0))
        out = np.outer(pos.reshape(-1).astype(np.float64), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    cols, rows = np.meshgrid(np.arange(grid), np.arange(grid))
    return np.concatenate([one_d(dim // 2, cols), one_d(dim // 2, rows)], axis=1)


def random_tensors(shapes: dict, g: torch.Generator) -> dict:
    out = {}
    for name, shape in shapes.items():
        if name.endswith("pos_embed"):
            t = torch.from_numpy(sincos_2d(shape[1], int(math.isqrt(shape[0])))).float()
        elif len(shape) == 1 and ("norm" in name or name.endswith("layernorm.weight")) and name.endswith("weight"):
            t = 1.0 + 0.1 * torch.randn(shape, generator=g)
        elif len(shape) == 1:
            t = 0.02 * torch.randn(shape, generator=g)
        else:
            fan_in = int(np.prod(shape[1:]))
            t = torch.randn(shape, generator=g) / math.sqrt(fan_in)
        out[name] = t.contiguous()
    return out


def configs(tok) -> tuple:
    ids = {t: tok.convert_tokens_to_ids(t) for t in SPECIALS}
    llm = {
        "architectures": ["Qwen2ForCausalLM"],
        "model_type": "qwen2",
        "vocab_size": len(tok),
        "hidden_size": HIDDEN,
        "intermediate_size": INTER,
        "num_hidden_layers": LAYERS,
        "num_attention_heads": HEADS,
        "num_key_value_heads": KV_HEADS,
        "hidden_act": "silu",
        "max_position_embeddings": 4096,
        "max_window_layers": LAYERS,
        "rms_norm_eps": 1e-6,
        "rope_theta": 1000000.0,
        "sliding_window": None,
        "use_sliding_window": False,
        "tie_word_embeddings": False,
        "qk_norm": True,
        "layer_module": "Qwen2MoTDecoderLayer",
        "bos_token_id": ids["<|im_start|>"],
        "eos_token_id": ids["<|im_end|>"],
        "torch_dtype": "float32",
    }
    vit_used = {
        "model_type": "siglip_vision_model",
        "hidden_size": VIT_HIDDEN,
        "intermediate_size": VIT_INTER,
        "num_hidden_layers": VIT_LAYERS,
        "num_attention_heads": VIT_HEADS,
        "num_channels": 3,
        "image_size": VIT_PATCH * VIT_SIDE,
        "patch_size": VIT_PATCH,
        "hidden_act": "gelu_pytorch_tanh",
        "layer_norm_eps": 1e-6,
        "attention_dropout": 0.0,
    }
    vit_json = dict(vit_used, num_hidden_layers=VIT_LAYERS + 1)  # the official loader drops one
    root = {
        "architectures": ["BagelForConditionalGeneration"],
        "model_type": "bagel",
        "visual_gen": True,
        "visual_und": True,
        "llm_config": llm,
        "vit_config": vit_used,
        "vae_config": {"z_channels": Z, "downsample": 8},
        "latent_patch_size": LATENT_PATCH,
        "max_latent_size": MAX_LATENT,
        "vit_max_num_patch_per_side": VIT_SIDE,
        "connector_act": "gelu_pytorch_tanh",
        "interpolate_pos": False,
        "timestep_shift": 1.0,
        "torch_dtype": "float32",
    }
    return root, llm, vit_json, ids


def write(out: str, seed: int = 0) -> str:
    os.makedirs(out, exist_ok=True)
    tok = make_tokenizer()
    tok.save_pretrained(out)
    root, llm, vit_json, ids = configs(tok)
    for name, obj in (("config.json", root), ("llm_config.json", llm), ("vit_config.json", vit_json)):
        with open(os.path.join(out, name), "w") as f:
            json.dump(obj, f, indent=2)
    side = VIT_PATCH * VIT_SIDE
    with open(os.path.join(out, "preprocessor_config.json"), "w") as f:
        json.dump(
            {
                "image_processor_type": "SiglipImageProcessor",
                "processor_class": "BagelProcessor",
                "do_resize": True,
                "size": {"height": side, "width": side},
                "resample": 3,
                "do_rescale": True,
                "rescale_factor": 1 / 255,
                "do_normalize": True,
                "image_mean": [0.5, 0.5, 0.5],
                "image_std": [0.5, 0.5, 0.5],
                "do_convert_rgb": True,
            },
            f,
            indent=2,
        )
    with open(os.path.join(out, "generation_config.json"), "w") as f:
        json.dump(
            {
                "bos_token_id": ids["<|im_start|>"],
                "eos_token_id": ids["<|im_end|>"],
                "pad_token_id": ids["<|endoftext|>"],
            },
            f,
            indent=2,
        )
    g = torch.Generator().manual_seed(seed)
    save_file(random_tensors(ema_shapes(len(tok)), g), os.path.join(out, "ema.safetensors"))
    save_file(random_tensors(ae_shapes(), g), os.path.join(out, "ae.safetensors"))
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out_dir")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    write(args.out_dir, args.seed)
    print(f"tiny BAGEL in {args.out_dir}")


if __name__ == "__main__":
    main(sys.argv[1:])
