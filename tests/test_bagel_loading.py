"""Loading the official BAGEL folder: the exact official key set (written here from the naming
scheme, independently of the module), errors that name missing / extra / mis-shaped keys, the ViT
depth rule, dtype and device arguments, the FLUX VAE (BFL names via diffusers' converter) and the
patch layouts."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from alphagrpo_serve.models.bagel import (
    BagelConfig,
    CheckpointError,
    Text,
    VaeImage,
    VitImage,
    load_flux_vae,
    load_model,
    patchify,
    prefill,
    text_step,
    unpatchify,
    velocity,
)


def official_ema_keys(n_layers: int, n_vit_layers: int) -> set:
    """BAGEL-7B-MoT's ema.safetensors names (official modeling/bagel/*.py attribute paths)."""
    keys = {
        "language_model.model.embed_tokens.weight",
        "language_model.model.norm.weight",
        "language_model.model.norm_moe_gen.weight",
        "language_model.lm_head.weight",
        "connector.fc1.weight",
        "connector.fc1.bias",
        "connector.fc2.weight",
        "connector.fc2.bias",
        "vit_pos_embed.pos_embed",
        "latent_pos_embed.pos_embed",
        "vae2llm.weight",
        "vae2llm.bias",
        "llm2vae.weight",
        "llm2vae.bias",
        "time_embedder.mlp.0.weight",
        "time_embedder.mlp.0.bias",
        "time_embedder.mlp.2.weight",
        "time_embedder.mlp.2.bias",
        "vit_model.vision_model.embeddings.patch_embedding.weight",
        "vit_model.vision_model.embeddings.patch_embedding.bias",
        "vit_model.vision_model.embeddings.position_embedding.weight",
        "vit_model.vision_model.post_layernorm.weight",
        "vit_model.vision_model.post_layernorm.bias",
    }
    for n in range(n_layers):
        for gen in ("", "_moe_gen"):
            pre = f"language_model.model.layers.{n}"
            keys |= {
                f"{pre}.self_attn.{p}{gen}.{w}" for p in ("q_proj", "k_proj", "v_proj") for w in ("weight", "bias")
            }
            keys |= {
                f"{pre}.self_attn.o_proj{gen}.weight",
                f"{pre}.self_attn.q_norm{gen}.weight",
                f"{pre}.self_attn.k_norm{gen}.weight",
                f"{pre}.input_layernorm{gen}.weight",
                f"{pre}.post_attention_layernorm{gen}.weight",
            }
            keys |= {f"{pre}.mlp{gen}.{p}_proj.weight" for p in ("gate", "up", "down")}
    for n in range(n_vit_layers):
        pre = f"vit_model.vision_model.encoder.layers.{n}"
        keys |= {
            f"{pre}.self_attn.{p}.{w}" for p in ("q_proj", "k_proj", "v_proj", "out_proj") for w in ("weight", "bias")
        }
        keys |= {
            f"{pre}.{m}.{w}" for m in ("layer_norm1", "layer_norm2", "mlp.fc1", "mlp.fc2") for w in ("weight", "bias")
        }
    return keys


def file_keys(path):
    with safe_open(path, framework="pt") as f:
        return set(f.keys())


def test_tiny_checkpoint_and_module_carry_exactly_the_official_keys(tiny_bagel_dir, tiny_bagel):
    with open(os.path.join(tiny_bagel_dir, "llm_config.json")) as f:
        n_layers = json.load(f)["num_hidden_layers"]
    with open(os.path.join(tiny_bagel_dir, "vit_config.json")) as f:
        n_vit = json.load(f)["num_hidden_layers"] - 1  # BAGEL builds one ViT layer less than it says
    expected = official_ema_keys(n_layers, n_vit)
    assert file_keys(os.path.join(tiny_bagel_dir, "ema.safetensors")) == expected
    assert set(tiny_bagel.model.state_dict()) == expected  # export/import and LoRA names are official
    ae = file_keys(os.path.join(tiny_bagel_dir, "ae.safetensors"))
    assert all(k.startswith(("encoder.", "decoder.")) for k in ae) and "encoder.down.0.block.0.norm1.weight" in ae
    # the linear patch embedding layout [hidden, 3 * p * p]
    v = tiny_bagel.config.vit
    assert tuple(tiny_bagel.model.vit_model.vision_model.embeddings.patch_embedding.weight.shape) == (
        v.hidden_size,
        3 * v.patch_size**2,
    )


def test_vit_depth_rule_and_config_sources(tiny_bagel_dir, tmp_path):
    cfg = BagelConfig.from_folder(tiny_bagel_dir)
    with open(os.path.join(tiny_bagel_dir, "config.json")) as f:
        root = json.load(f)
    assert cfg.vit.num_hidden_layers == 2
    # what vLLM builds from the inline copy (drops one layer only when it says 27): the same tower
    inline = root["vit_config"]["num_hidden_layers"]
    assert (26 if inline == 27 else inline) == cfg.vit.num_hidden_layers
    assert cfg.llm.qk_norm and not cfg.llm.tie_word_embeddings
    assert cfg.vit.image_size // cfg.vit.patch_size == cfg.vit_max_num_patch_per_side  # vLLM's need
    # without the separate files the loader falls back to config.json's inline copies (vLLM's rule)
    alt = tmp_path / "inline"
    shutil.copytree(tiny_bagel_dir, alt)
    os.remove(alt / "vit_config.json")
    os.remove(alt / "llm_config.json")
    cfg2 = BagelConfig.from_folder(str(alt))
    assert cfg2.vit.num_hidden_layers == 2 and cfg2.llm.num_hidden_layers == cfg.llm.num_hidden_layers


def broken_copy(src, dst, edit):
    shutil.copytree(src, dst)
    sd = load_file(os.path.join(dst, "ema.safetensors"))
    edit(sd)
    save_file(sd, os.path.join(dst, "ema.safetensors"))
    return str(dst)


@pytest.mark.parametrize("case", ["missing", "extra", "shape"])
def test_loader_errors_name_the_key(tiny_bagel_dir, tmp_path, case):
    key = "language_model.model.layers.1.self_attn.k_norm_moe_gen.weight"
    edits = {
        "missing": lambda sd: sd.pop(key),
        "extra": lambda sd: sd.update({"language_model.model.layers.9.mlp.up_proj.weight": torch.zeros(2)}),
        "shape": lambda sd: sd.update({key: torch.zeros(sd[key].shape[0] + 1)}),
    }
    path = broken_copy(tiny_bagel_dir, tmp_path / case, edits[case])
    expect = {
        "missing": rf"missing key '{key}'",
        "extra": r"unexpected key 'language_model\.model\.layers\.9\.mlp\.up_proj\.weight'",
        "shape": rf"key '{key}' has shape \[33\], expected \[32\]",
    }[case]
    with pytest.raises(CheckpointError, match=expect):
        load_model(path)


def test_ae_errors_name_the_key(tiny_bagel_dir, tmp_path):
    sd = load_file(os.path.join(tiny_bagel_dir, "ae.safetensors"))
    sd.pop("decoder.up.2.block.1.conv2.bias")
    save_file(sd, tmp_path / "ae.safetensors")
    # named by its diffusers name (the BFL name has no target once it is gone); BFL up.2 = diffusers up_blocks.1
    with pytest.raises(CheckpointError, match=r"missing key for 'decoder\.up_blocks\.1\.resnets\.1\.conv2\.bias'"):
        load_flux_vae(str(tmp_path / "ae.safetensors"))
    sd = load_file(os.path.join(tiny_bagel_dir, "ae.safetensors"))
    sd["decoder.mid.attn_1.q.weight"] = sd["decoder.mid.attn_1.q.weight"][:8]
    save_file(sd, tmp_path / "ae.safetensors")
    with pytest.raises(CheckpointError, match=r"key 'decoder\.mid\.attn_1\.q\.weight' has shape \[8, 64, 1, 1\]"):
        load_flux_vae(str(tmp_path / "ae.safetensors"))


def test_dtype_device_and_frozen_tables(tiny_bagel_dir, tiny_bagel):
    assert all(p.dtype == torch.float32 and p.device.type == "cpu" for p in tiny_bagel.model.parameters())
    m16 = load_model(tiny_bagel_dir, dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in m16.parameters())
    assert not any(p.is_meta for p in m16.parameters()) and not any(b.is_meta for b in m16.buffers())
    ref = tiny_bagel.model.state_dict()
    for k, v in m16.state_dict().items():
        assert torch.equal(v, ref[k].to(torch.bfloat16)), k
    assert not m16.latent_pos_embed.pos_embed.requires_grad and m16.vae2llm.weight.requires_grad
    m16.special_tokens = tiny_bagel.model.special_tokens
    with torch.no_grad():  # the whole core runs in bfloat16
        pf = prefill(m16, [[Text([1, 10, 2]), VitImage(torch.zeros(3, 32, 32)), VaeImage(torch.zeros(4, 64), (2, 2))]])
        v = velocity(m16, pf.cache, torch.randn(1, 4, 64), 0.5, (2, 2))
        logits, _ = text_step(m16, pf.cache, torch.tensor([3]))
    assert v.dtype == logits.dtype == torch.bfloat16 and torch.isfinite(v).all() and torch.isfinite(logits).all()


def test_vae_encode_decode_shapes_and_normalisation(tiny_bagel_dir, tiny_bagel):
    vae = tiny_bagel.vae
    img = (np.random.RandomState(0).rand(2, 32, 48, 3) * 255).astype(np.uint8)
    z = vae.encode(img)
    assert z.shape == (2, 16, 4, 6) and z.dtype == torch.float32
    # z = 0.3611 (mean - 0.1159)
    mean = vae.ae.encode(torch.as_tensor(img).permute(0, 3, 1, 2).float() / 127.5 - 1).latent_dist.mode()
    assert torch.allclose(z, (mean - 0.1159) * 0.3611, atol=1e-6)
    out = vae.decode(z)
    assert out.shape == (2, 32, 48, 3) and out.dtype == torch.uint8
    with pytest.raises(ValueError, match="multiple of 8"):
        vae.encode(np.zeros((1, 30, 32, 3), np.uint8))
    # every BFL tensor landed somewhere: the diffusers model has as many tensors as the file
    assert len(vae.ae.state_dict()) == len(file_keys(os.path.join(tiny_bagel_dir, "ae.safetensors")))


def test_patch_layouts_are_row_major_with_channels_last_inside():
    # a [2, 4, 4] latent with p = 2: token (r, c) holds pixels (2r + i, 2c + j) in (i, j, channel) order
    x = torch.arange(2 * 4 * 4, dtype=torch.float32).reshape(2, 4, 4)
    tok = patchify(x, 2)
    assert tok.shape == (4, 8)
    assert tok[1].tolist() == [
        x[0, 0, 2],
        x[1, 0, 2],
        x[0, 0, 3],
        x[1, 0, 3],
        x[0, 1, 2],
        x[1, 1, 2],
        x[0, 1, 3],
        x[1, 1, 3],
    ]
    assert torch.equal(unpatchify(tok, (2, 2), 2, 2), x)
    batch = torch.randn(3, 16, 6, 8)
    assert torch.equal(unpatchify(patchify(batch, 2), (3, 4), 2, 16), batch)


def test_position_tables_fix_the_grids(tiny_bagel_dir, tmp_path):
    alt = tmp_path / "grid"
    shutil.copytree(tiny_bagel_dir, alt)
    with open(alt / "config.json") as f:
        root = json.load(f)
    root["max_latent_size"] = 32  # disagrees with latent_pos_embed (8 x 8)
    with open(alt / "config.json", "w") as f:
        json.dump(root, f)
    with pytest.warns(UserWarning, match="max_latent_size=32 but latent_pos_embed.pos_embed covers a 8x8 grid"):
        m = load_model(str(alt))
    assert m.config.max_latent_size == 8
