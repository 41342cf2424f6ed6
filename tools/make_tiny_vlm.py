"""Builds the tiny randomly initialised models of the vLLM test tier, locally (nothing is downloaded).

Run with the vLLM venv's Python (it has transformers and tokenizers):
    .venv-vllm/bin/python tools/make_tiny_vlm.py OUT_DIR
writes OUT_DIR/llm (a 2-layer Llama text model: the decomposer) and OUT_DIR/vlm (a BLIP-2 with a
1-layer ViT on 32x32 images, a 1-layer Q-Former with 8 queries and a 2-layer OPT: the verifier),
each with a byte-level BPE tokenizer trained here on a small corpus and a chat template. Their
answers are meaningless; they exist to test the plumbing. About 3 MB in all.
"""

from __future__ import annotations

import os
import sys

import torch

CHAT_TEMPLATE = (
    "{% for m in messages %}"
    "{% if m['content'] is string %}{{ m['role'] }}: {{ m['content'] }}\n"
    "{% else %}{{ m['role'] }}: {% for c in m['content'] %}{% if c['type'] == 'text' %}{{ c['text'] }}{% endif %}"
    "{% endfor %}\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)


def corpus():
    words = (
        "a an the red green blue yellow purple orange circle square triangle shape shapes two three four "
        "left right above below of to is are does do can has have there image picture question answer yes no "
        "Yes No semantic quality tag aspect Existence Count Attribute Spatial Geometry Texture Coherence "
        "Aesthetics Style Environment Viewpoint Action Text Negative Anatomy Lighting Physics Legibility"
    ).split()
    lines = [" ".join(words[i : i + 7]) for i in range(0, len(words), 3)]
    lines += [
        '{"semantic": [{"question": "Is there a red circle?", "tag": "Existence"}], "quality": []}',
        "Look at the image and answer the question with a single word: yes or no.",
        "user: assistant: system:",
    ]
    return lines * 20


def tokenizer(extra_special=()):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<s>", "</s>", "<pad>", "<unk>", *extra_special]
    trainer = trainers.BpeTrainer(
        vocab_size=600,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus(), trainer)
    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        additional_special_tokens=list(extra_special),
    )
    hf.chat_template = CHAT_TEMPLATE
    return hf


def make_llm(out: str) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = tokenizer()
    cfg = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        head_dim=64,
        max_position_embeddings=4096,
        tie_word_embeddings=True,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).save_pretrained(out)
    tok.save_pretrained(out)


def make_vlm(out: str) -> None:
    from transformers import Blip2Config, Blip2ForConditionalGeneration, Blip2Processor, BlipImageProcessor, OPTConfig

    tok = tokenizer(extra_special=("<image>",))
    text = OPTConfig(
        vocab_size=len(tok),
        hidden_size=128,
        num_attention_heads=2,
        num_hidden_layers=2,
        ffn_dim=256,
        word_embed_proj_dim=128,
        max_position_embeddings=1024,
        tie_word_embeddings=True,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    cfg = Blip2Config(
        vision_config=dict(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=1,
            num_attention_heads=2,
            image_size=32,
            patch_size=8,
        ),
        qformer_config=dict(
            hidden_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            intermediate_size=128,
            encoder_hidden_size=64,
            vocab_size=len(tok),
        ),
        text_config=text.to_dict(),
        num_query_tokens=8,
        image_token_index=tok.convert_tokens_to_ids("<image>"),
    )
    torch.manual_seed(0)
    Blip2ForConditionalGeneration(cfg).save_pretrained(out)
    proc = Blip2Processor(
        image_processor=BlipImageProcessor(size={"height": 32, "width": 32}), tokenizer=tok, num_query_tokens=8
    )
    proc.chat_template = CHAT_TEMPLATE
    proc.save_pretrained(out)
    tok.save_pretrained(out)


if __name__ == "__main__":
    if len(sys.argv) != 2:
        raise SystemExit(__doc__)
    root = sys.argv[1]
    make_llm(os.path.join(root, "llm"))
    make_vlm(os.path.join(root, "vlm"))
    print(f"tiny models in {root}/llm and {root}/vlm")
