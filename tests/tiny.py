"""Tiny random-weight models of every supported family, built offline from configs."""

from __future__ import annotations

import torch
import transformers as tf

# initializer_range: BLIP's default of 1e-10 gives weights that vanish in float16
VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=32, patch_size=8,
              initializer_range=0.02)
TEXT = dict(vocab_size=99, bos_token_id=1, eos_token_id=2, pad_token_id=0, hidden_size=32, intermediate_size=64,
            num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=32)
IMAGE_TOKEN = 99  # BLIP-2 / InstructBLIP: inside the LM vocab of 100


def clip(cls=tf.CLIPModel, seed: int = 0, attn: str = "sdpa"):
    torch.manual_seed(seed)
    config = tf.CLIPConfig(text_config=dict(TEXT, projection_dim=16), vision_config=dict(VISION, projection_dim=16),
                           projection_dim=16)
    if cls in (tf.CLIPTextModel, tf.CLIPTextModelWithProjection):
        config = config.text_config
    elif cls in (tf.CLIPVisionModel, tf.CLIPVisionModelWithProjection):
        config = config.vision_config
    config._attn_implementation = attn
    return cls(config).eval()


def blip_config():
    text = dict(TEXT, bos_token_id=3, eos_token_id=2, sep_token_id=2, pad_token_id=0)
    config = tf.BlipConfig(text_config=text, vision_config=VISION,
                           image_text_hidden_size=16, projection_dim=16)
    return config


def blip(cls=tf.BlipForConditionalGeneration, seed: int = 0):
    torch.manual_seed(seed)
    return cls(blip_config()).eval()


def _blip2_config(lm: str, cls_config=tf.Blip2Config, qformer_cls=tf.Blip2QFormerConfig):
    vision = dict(VISION)
    qformer = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                   cross_attention_frequency=1, vocab_size=99, max_position_embeddings=32)
    if lm == "opt":
        text = tf.OPTConfig(vocab_size=100, hidden_size=32, ffn_dim=64, num_hidden_layers=2, num_attention_heads=4,
                            word_embed_proj_dim=32, max_position_embeddings=64, pad_token_id=1, bos_token_id=2,
                            eos_token_id=2)
    else:
        text = tf.T5Config(vocab_size=100, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=2, num_heads=4,
                           decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)
    return cls_config(vision_config=vision, qformer_config=qformer, text_config=text.to_dict(), num_query_tokens=4,
                      image_token_index=IMAGE_TOKEN)


def blip2(lm: str = "opt", cls=tf.Blip2ForConditionalGeneration, seed: int = 0):
    torch.manual_seed(seed)
    model = cls(_blip2_config(lm))
    with torch.no_grad():  # query tokens start at zero, which leaves the first Q-Former layer without gradient
        model.query_tokens.normal_()
    return model.eval()


def instructblip(lm: str = "opt", seed: int = 0):
    torch.manual_seed(seed)
    config = _blip2_config(lm, tf.InstructBlipConfig)
    model = tf.InstructBlipForConditionalGeneration(config)
    with torch.no_grad():
        model.query_tokens.normal_()
    return model.eval()


def llama(seed: int = 0, attn: str = "sdpa", width: int = 32):
    torch.manual_seed(seed)
    config = tf.LlamaConfig(vocab_size=100, hidden_size=width, intermediate_size=2 * width, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                            pad_token_id=0, bos_token_id=1, eos_token_id=2)
    config._attn_implementation = attn
    return tf.LlamaForCausalLM(config).eval()


def gpt2(seed: int = 0, attn: str = "sdpa"):
    torch.manual_seed(seed)
    config = tf.GPT2Config(vocab_size=100, n_embd=32, n_layer=2, n_head=4, n_positions=64, pad_token_id=0,
                           bos_token_id=1, eos_token_id=2)
    config._attn_implementation = attn
    return tf.GPT2LMHeadModel(config).eval()


def opt(seed: int = 0, attn: str = "sdpa"):
    torch.manual_seed(seed)
    config = tf.OPTConfig(vocab_size=100, hidden_size=32, ffn_dim=64, num_hidden_layers=2, num_attention_heads=4,
                          word_embed_proj_dim=32, max_position_embeddings=64, pad_token_id=1, bos_token_id=2,
                          eos_token_id=2)
    config._attn_implementation = attn
    return tf.OPTForCausalLM(config).eval()


def t5(seed: int = 0, attn: str = "sdpa"):
    torch.manual_seed(seed)
    config = tf.T5Config(vocab_size=100, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=2, num_heads=4,
                         decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)
    config._attn_implementation = attn
    return tf.T5ForConditionalGeneration(config).eval()


def pixels(batch: int = 2, seed: int = 1) -> torch.Tensor:
    return torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def tokens(batch: int = 2, length: int = 7, low: int = 4, high: int = 90, seed: int = 2) -> torch.Tensor:
    return torch.randint(low, high, (batch, length), generator=torch.Generator().manual_seed(seed))


def _ids_with_image_tokens(batch: int = 2) -> torch.Tensor:
    ids = tokens(batch)
    ids[:, :4] = IMAGE_TOKEN
    return ids


def _padded_mask(ids: torch.Tensor) -> torch.Tensor:
    mask = torch.ones_like(ids)
    mask[0, -2:] = 0  # right padding in row 0
    return mask


# name -> (build model, build inputs, read the output to compare). Every family that issue 2 names.
FAMILIES = {
    "clip": (lambda: clip(), lambda: dict(input_ids=tokens(), pixel_values=pixels(), attention_mask=_padded_mask(tokens())),
             lambda o: o.logits_per_image),
    "clip_text": (lambda: clip(tf.CLIPTextModel), lambda: dict(input_ids=tokens()), lambda o: o.last_hidden_state),
    "clip_text_proj": (lambda: clip(tf.CLIPTextModelWithProjection), lambda: dict(input_ids=tokens()), lambda o: o.text_embeds),
    "clip_vision": (lambda: clip(tf.CLIPVisionModel), lambda: dict(pixel_values=pixels()), lambda o: o.last_hidden_state),
    "clip_vision_proj": (lambda: clip(tf.CLIPVisionModelWithProjection), lambda: dict(pixel_values=pixels()),
                         lambda o: o.image_embeds),
    "blip_caption": (lambda: blip(), lambda: dict(input_ids=tokens(), pixel_values=pixels(), attention_mask=_padded_mask(tokens())),
                     lambda o: o.logits),
    "blip_vqa": (lambda: blip(tf.BlipForQuestionAnswering),
                 lambda: dict(input_ids=tokens(), pixel_values=pixels(), labels=tokens(length=4, seed=3)), lambda o: o.loss),
    "blip_retrieval": (lambda: blip(tf.BlipForImageTextRetrieval), lambda: dict(input_ids=tokens(), pixel_values=pixels()),
                       lambda o: o.itm_score),
    "blip2_opt": (lambda: blip2("opt"),
                  lambda: dict(input_ids=_ids_with_image_tokens(), pixel_values=pixels(),
                               attention_mask=torch.ones_like(_ids_with_image_tokens())), lambda o: o.logits),
    "blip2_t5": (lambda: blip2("t5"),
                 lambda: dict(input_ids=_ids_with_image_tokens(), pixel_values=pixels(),
                              attention_mask=torch.ones_like(_ids_with_image_tokens()), labels=tokens(length=4, seed=3)),
                 lambda o: o.logits),
    "blip2_model": (lambda: blip2("opt", cls=tf.Blip2Model),
                    lambda: dict(input_ids=_ids_with_image_tokens(), pixel_values=pixels(),
                                 attention_mask=torch.ones_like(_ids_with_image_tokens())), lambda o: o.logits),
    "instructblip": (lambda: instructblip(),
                     lambda: dict(input_ids=_ids_with_image_tokens(), pixel_values=pixels(),
                                  attention_mask=torch.ones_like(_ids_with_image_tokens()),
                                  qformer_input_ids=tokens(length=5, seed=4)), lambda o: o.logits),
    "llama": (lambda: llama(), lambda: dict(input_ids=tokens(), attention_mask=_padded_mask(tokens())), lambda o: o.logits),
    "gpt2": (lambda: gpt2(), lambda: dict(input_ids=tokens(), attention_mask=_padded_mask(tokens())), lambda o: o.logits),
    "opt": (lambda: opt(), lambda: dict(input_ids=tokens(), attention_mask=_padded_mask(tokens())), lambda o: o.logits),
    "t5": (lambda: t5(), lambda: dict(input_ids=tokens(), attention_mask=_padded_mask(tokens()),
                                      labels=tokens(length=4, seed=3)), lambda o: o.logits),
}


# family -> (generation inputs, extra generate kwargs)
GENERATORS = {
    "llama": (lambda: dict(input_ids=tokens(), attention_mask=torch.ones(2, 7, dtype=torch.long)), dict(pad_token_id=0)),
    "gpt2": (lambda: dict(input_ids=tokens(), attention_mask=torch.ones(2, 7, dtype=torch.long)), dict(pad_token_id=0)),
    "opt": (lambda: dict(input_ids=tokens(), attention_mask=torch.ones(2, 7, dtype=torch.long)), dict()),
    "t5": (lambda: dict(input_ids=tokens(), attention_mask=torch.ones(2, 7, dtype=torch.long)), dict()),
    "blip_caption": (lambda: dict(pixel_values=pixels()), dict()),
    "blip_vqa": (lambda: dict(input_ids=tokens(), pixel_values=pixels()), dict()),
    "blip2_opt": (lambda: dict(input_ids=_ids_with_image_tokens(), pixel_values=pixels(),
                               attention_mask=torch.ones(2, 7, dtype=torch.long)), dict()),
    "blip2_t5": (lambda: dict(input_ids=_ids_with_image_tokens(), pixel_values=pixels(),
                              attention_mask=torch.ones(2, 7, dtype=torch.long)), dict()),
    "instructblip": (lambda: dict(input_ids=_ids_with_image_tokens(), pixel_values=pixels(),
                                  attention_mask=torch.ones(2, 7, dtype=torch.long),
                                  qformer_input_ids=tokens(length=5, seed=4)), dict()),
}


class TinyProcessor:
    """Stands in for a model's processor offline: words become ids through a fixed hash, images 32 px tensors.
    ``image_tokens`` prepends BLIP-2's image placeholders; ``qformer`` adds InstructBLIP's Q-Former text."""

    def __init__(self, image_tokens: int = 0, qformer: bool = False) -> None:
        self.image_tokens, self.qformer = image_tokens, qformer

    def __call__(self, text=None, images=None, return_tensors="pt", add_special_tokens=True):
        out = {}
        if text is not None:
            words = [4 + sum(map(ord, w)) % 86 for w in text.split()]
            ids = torch.tensor([[IMAGE_TOKEN] * (self.image_tokens if add_special_tokens else 0) + words])
            out.update(input_ids=ids, attention_mask=torch.ones_like(ids))
            if self.qformer:
                out.update(qformer_input_ids=torch.tensor([words]), qformer_attention_mask=torch.ones(1, len(words)))
        if images is not None:
            pixels = torch.tensor(list(images.resize((32, 32)).getdata()), dtype=torch.float32) / 127.5 - 1
            out["pixel_values"] = pixels.T.reshape(1, 3, 32, 32)
        return out


PROCESSORS = {
    "blip2_opt": TinyProcessor(image_tokens=4),
    "blip2_t5": TinyProcessor(image_tokens=4),
    "blip2_model": TinyProcessor(image_tokens=4),
    "instructblip": TinyProcessor(image_tokens=4, qformer=True),
}


def processor(family: str) -> TinyProcessor:
    return PROCESSORS.get(family, TinyProcessor())


def blip_processor() -> "tf.BlipProcessor":
    """A real BlipProcessor built offline: a word-level BERT vocabulary and a 32 px image processor."""
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + "a photo of the what is color red blue".split()
    tokenizer = tf.BertTokenizer(vocab={w: i for i, w in enumerate(words)})
    return tf.BlipProcessor(image_processor=tf.BlipImageProcessor(size={"height": 32, "width": 32}), tokenizer=tokenizer)


# Families whose output has one row per sample (BLIP-VQA returns only a batch loss: routed through generate).
def rows(family: str, output):
    if family == "clip":
        return torch.cat([output.image_embeds, output.text_embeds], dim=-1)
    return FAMILIES[family][2](output)


ROW_FAMILIES = sorted(f for f in FAMILIES if f != "blip_vqa")

# Hand-written routes whose gated prefix or memory runs SDPA where the model runs its own eager attention
# (mmprefix/core/attention/blip.py says why): a closed gate or an empty memory equals the model only to rounding.
SDPA_ROUTES = {"blip_vision", "blip_text", "git_text"}


def no_op_tolerance(pm) -> dict:
    """``assert_close`` tolerances for "a closed gate or an empty memory is the model": bit for bit where every
    site runs the model's own attention, float32 rounding where a site is on one of ``SDPA_ROUTES``."""
    if any(site.route in SDPA_ROUTES for site in pm.sites):
        return dict(rtol=1e-5, atol=1e-6)
    return dict(rtol=0, atol=0)


# -- open_clip ------------------------------------------------------------------------------------------------
OPEN_CLIP_VISION = dict(image_size=32, layers=2, width=32, head_width=8, patch_size=8)
OPEN_CLIP_TEXT = dict(context_length=12, vocab_size=100, width=32, heads=4, layers=2)
OPEN_CLIP_CONFIGS = {
    "mmprefix-tiny-clip": dict(embed_dim=16, vision_cfg=OPEN_CLIP_VISION, text_cfg=OPEN_CLIP_TEXT),
    # CustomResidualAttentionBlock with open_clip's own Attention: qk-norm and per-head scaling
    "mmprefix-tiny-clip-custom": dict(
        embed_dim=16, custom_text=True,
        vision_cfg=dict(OPEN_CLIP_VISION, qk_norm=True, scale_heads=True),
        text_cfg=dict(OPEN_CLIP_TEXT, qk_norm=True, scale_heads=True),
    ),
    "mmprefix-tiny-coca": dict(
        embed_dim=32, custom_text=True,
        vision_cfg=dict(OPEN_CLIP_VISION, attentional_pool=True, attn_pooler_heads=4, output_tokens=True),
        text_cfg=dict(OPEN_CLIP_TEXT, embed_cls=True, output_tokens=True),
        multimodal_cfg=dict(context_length=12, vocab_size=100, width=32, heads=4, layers=2, attn_pooler_heads=4),
    ),
    "mmprefix-tiny-clip-timm": dict(
        embed_dim=16, vision_cfg=dict(timm_model_name="vit_tiny_patch16_224", timm_model_pretrained=False,
                                      timm_pool="token", timm_proj="linear", image_size=32),
        text_cfg=OPEN_CLIP_TEXT,
    ),
}
SOT, EOT = 98, 99  # tiny open_clip vocabulary: start and end of text


def open_clip_model(name: str = "mmprefix-tiny-clip", seed: int = 0):
    import json
    import tempfile
    from pathlib import Path

    import open_clip

    if name not in open_clip.list_models():
        folder = Path(tempfile.mkdtemp(prefix="mmprefix-open-clip-"))
        for config_name, config in OPEN_CLIP_CONFIGS.items():
            (folder / f"{config_name}.json").write_text(json.dumps(config))
        open_clip.add_model_config(folder)
    torch.manual_seed(seed)
    model = open_clip.create_model(name, pretrained=None)
    if hasattr(model, "text_decoder"):  # CoCa leaves its decoder projection uninitialised (torch.empty)
        torch.nn.init.normal_(model.text_decoder.text_projection, std=32**-0.5)
    return model.eval()


def open_clip_text(batch: int = 2, seed: int = 3) -> torch.Tensor:
    """Token ids padded to the context length: SOT, words, EOT, then padding 0."""
    text = torch.zeros(batch, 12, dtype=torch.long)
    words = torch.randint(1, 90, (batch, 6), generator=torch.Generator().manual_seed(seed))
    text[:, 0], text[:, 1:7], text[:, 7] = SOT, words, EOT
    return text


# -- evaluation: tiny models that read the embedded tokenizers' vocabularies, and their processors -------------
def world_blip(cls=tf.BlipForQuestionAnswering, seed: int = 0):
    """A random BLIP whose text vocabulary is the embedded BERT tokenizer's (a real BlipProcessor feeds it);
    weights ten times the default scale, so that random outputs vary with the image, question and prefix."""
    from mmprefix.embedded import text

    tokenizer = text.bert_tokenizer()
    text_config = dict(TEXT, vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id, pad_token_id=0,
                       eos_token_id=tokenizer.sep_token_id, sep_token_id=tokenizer.sep_token_id, initializer_range=0.2)
    config = tf.BlipConfig(text_config=text_config, vision_config=dict(VISION, initializer_range=0.2),
                           image_text_hidden_size=16, projection_dim=16)
    torch.manual_seed(seed)
    return cls(config).eval()


def world_blip_processor() -> "tf.BlipProcessor":
    from mmprefix.embedded import text

    return tf.BlipProcessor(image_processor=tf.BlipImageProcessor(size={"height": 32, "width": 32}),
                            tokenizer=text.bert_tokenizer())


def world_clip_processor() -> "tf.CLIPProcessor":
    """For `clip()`: 32 px images, the embedded LM tokenizer (its ids fit the vocabulary of 99)."""
    from mmprefix.embedded import text

    images = tf.CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    return tf.CLIPProcessor(image_processor=images, tokenizer=text.lm_tokenizer(append_eos=True))


def world_llama(seed: int = 0):
    """A random Llama over the embedded LM tokenizer's vocabulary."""
    from mmprefix.embedded import text

    tokenizer = text.lm_tokenizer()
    config = tf.LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                            pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                            eos_token_id=tokenizer.eos_token_id, initializer_range=0.2)
    torch.manual_seed(seed)
    return tf.LlamaForCausalLM(config).eval()


def open_clip_tokenizer(texts) -> torch.Tensor:
    """open_clip-style tokenizer for the tiny open_clip models: SOT, hashed words, EOT, zero padding to 12."""
    texts = [texts] if isinstance(texts, str) else list(texts)
    out = torch.zeros(len(texts), 12, dtype=torch.long)
    for row, text in enumerate(texts):
        ids = [SOT, *[1 + sum(map(ord, w)) % 89 for w in text.split()][:10], EOT]
        out[row, : len(ids)] = torch.tensor(ids)
    return out


def open_clip_preprocess(image) -> torch.Tensor:
    """open_clip-style preprocess for the tiny open_clip models: 32 px, scaled to [-1, 1]."""
    pixels = torch.tensor(list(image.convert("RGB").resize((32, 32)).getdata()), dtype=torch.float32) / 127.5 - 1
    return pixels.T.reshape(3, 32, 32)


def world_blip2(seed: int = 0):
    """A random BLIP-2 (OPT) that `mmprefix.embedded.blip2_processor()` feeds: 64 px images, 8 query tokens, the
    embedded LM tokenizer's vocabulary."""
    from mmprefix.embedded import QUERY_TOKENS, blip2_processor

    tokenizer = blip2_processor().tokenizer
    language = tf.OPTConfig(vocab_size=len(tokenizer), hidden_size=32, ffn_dim=64, num_hidden_layers=2,
                            num_attention_heads=4, word_embed_proj_dim=32, max_position_embeddings=64,
                            pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                            eos_token_id=tokenizer.eos_token_id, init_std=0.2)
    qformer = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                   cross_attention_frequency=1, vocab_size=len(tokenizer), max_position_embeddings=32)
    config = tf.Blip2Config(vision_config=dict(VISION, image_size=64, patch_size=16), qformer_config=qformer,
                            text_config=language.to_dict(), num_query_tokens=QUERY_TOKENS,
                            image_token_index=tokenizer.convert_tokens_to_ids("<image>"))
    torch.manual_seed(seed)
    model = tf.Blip2ForConditionalGeneration(config)
    with torch.no_grad():
        model.query_tokens.normal_()
    return model.eval()


def without_dropout(model):
    """``model`` with every dropout off (two forwards then compute the same)."""
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    return model


def gpt2_attention_by_hand(module, batch: int = 2, length: int = 5):
    """A GPT-2 attention module on random hidden states with a causal mask, and the same by hand: (its output, the
    queries ``[B, heads, T, 8]``, softmax attention over the input before the output projection, ``[B, heads, T,
    8]``). Tiny GPT-2: 4 heads of 8."""
    h = torch.randn(batch, length, 32, generator=torch.Generator().manual_seed(0))
    causal = torch.ones(length, length, dtype=torch.bool).tril()[None, None]
    with torch.no_grad():
        out = module(h, attention_mask=causal)[0]
        q, k, v = (x.view(batch, length, 4, 8).transpose(1, 2) for x in module.c_attn(h).split(32, dim=2))
        base = (q @ k.transpose(-1, -2) / 8**0.5).masked_fill(~causal, float("-inf")).softmax(-1) @ v
    return out, q, base
