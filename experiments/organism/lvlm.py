"""Assemble a real `LlavaForConditionalGeneration` from a text LLM, a pretrained vision tower and a new projector.

The language model is transplanted by name (`llm.model.state_dict()` → `llava.model.language_model`), so text-only
logits are identical before any VL training (tested). The tokenizer gains an `<image>` token when it has none
(the new embedding row is zero: it is always replaced by image features, and a zero output row keeps it from
ever being generated). The processor's chat template wraps the tokenizer's own template, so a text-only prompt
is formatted exactly as for the LLM, and an image part becomes `<image>\\n` before the text.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from vlsafe.analysis.adapters import adapter

IMAGE_TOKEN = "<image>"

# Turns list-of-parts messages into plain strings, then runs the tokenizer's own template unchanged.
_WRAP = (
    "{%- set ns = namespace(msgs=[]) -%}"
    "{%- for m in messages -%}"
    "{%- if m['content'] is string -%}{%- set ns.msgs = ns.msgs + [m] -%}"
    "{%- else -%}{%- set text = namespace(s='') -%}"
    "{%- for part in m['content'] -%}"
    "{%- if part['type'] == 'image' -%}{%- set text.s = text.s + '" + IMAGE_TOKEN + "\\n' -%}"
    "{%- elif part['type'] == 'text' -%}{%- set text.s = text.s + part['text'] -%}{%- endif -%}"
    "{%- endfor -%}"
    "{%- set ns.msgs = ns.msgs + [{'role': m['role'], 'content': text.s}] -%}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- set messages = ns.msgs -%}"
)


def processor_chat_template(tokenizer_template: str) -> str:
    """A processor chat template accepting `{"type": "image"}` parts, built around the tokenizer's template."""
    return _WRAP + tokenizer_template


def with_image_token(tokenizer: Any) -> tuple[Any, int]:
    """The tokenizer with an `<image>` special token (added when missing) and that token's id."""
    if IMAGE_TOKEN not in tokenizer.get_vocab():
        tokenizer.add_tokens([IMAGE_TOKEN], special_tokens=True)
    return tokenizer, int(tokenizer.convert_tokens_to_ids(IMAGE_TOKEN))


def assemble(llm_dir: str | Path, vision_dir: str | Path, *, kind: str, keep_cls: bool = False,
             seed: int = 0) -> tuple[Any, Any]:
    """(LlavaForConditionalGeneration, LlavaProcessor): LM from `llm_dir`, tower from `vision_dir`, projector
    freshly initialised (seeded), image features from the tower's last layer (CLIP's CLS token dropped unless
    `keep_cls`: LLaVA's "default" vs "full" feature strategy)."""
    from transformers import (AutoImageProcessor, AutoModel, AutoModelForCausalLM, AutoTokenizer, LlavaConfig,
                              LlavaForConditionalGeneration, LlavaProcessor)

    tok, image_id = with_image_token(AutoTokenizer.from_pretrained(str(llm_dir)))
    tok.padding_side = "left"
    llm = AutoModelForCausalLM.from_pretrained(str(llm_dir), dtype=torch.float32)
    old_vocab = llm.get_input_embeddings().weight.shape[0]
    if len(tok) > old_vocab:
        llm.resize_token_embeddings(len(tok), mean_resizing=False)
        with torch.no_grad():
            llm.get_input_embeddings().weight[old_vocab:] = 0
            if not llm.config.tie_word_embeddings:
                llm.get_output_embeddings().weight[old_vocab:] = 0
    tower = AutoModel.from_pretrained(str(vision_dir), dtype=torch.float32)
    vcfg = tower.config
    cls = kind == "clip"
    strategy = "default" if cls and not keep_cls else "full"
    n_tokens = (vcfg.image_size // vcfg.patch_size) ** 2 + (1 if cls and keep_cls else 0)
    cfg = LlavaConfig(vision_config=vcfg.to_dict() | {"model_type": vcfg.model_type}, text_config=llm.config,
                      image_token_index=image_id, vision_feature_select_strategy=strategy, vision_feature_layer=-1,
                      image_seq_length=n_tokens, projector_hidden_act="gelu",
                      tie_word_embeddings=bool(llm.config.tie_word_embeddings))
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(cfg)
    # The attention every reloaded checkpoint runs (vlsafe.probes.models.load); on CPU with padded batches it was
    # also faster than SDPA's masked path (docs/performance.md).
    model.set_attn_implementation("eager")
    into, src = adapter(model), adapter(llm)  # module paths from the families' files
    into.language_model().load_state_dict(src.language_model().state_dict())
    if not llm.config.tie_word_embeddings:
        into.require("lm_head").load_state_dict(src.require("lm_head").state_dict())
    into.require("vision_tower").load_state_dict(tower.state_dict())
    model.generation_config = llm.generation_config
    processor = LlavaProcessor(
        image_processor=AutoImageProcessor.from_pretrained(str(vision_dir)), tokenizer=tok,
        patch_size=vcfg.patch_size, vision_feature_select_strategy=strategy,
        num_additional_image_tokens=1 if kind == "clip" else 0,
        chat_template=processor_chat_template(tok.chat_template))
    return model.eval(), processor
