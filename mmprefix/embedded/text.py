"""Word-level tokenizers for the synthetic world, built offline from its fixed vocabulary.

Every word the world's templates can produce is known in advance, so a word-level vocabulary is exact:
nothing becomes [UNK]. BLIP gets a BERT tokenizer (lower-casing, punctuation split), the language models a
fast word-level tokenizer with the same pre-tokenisation.
"""

from __future__ import annotations

from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
from transformers import BertTokenizer, PreTrainedTokenizerFast

from ..data import synthetic

BERT_SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[DEC]", "[ENC]"]
LM_SPECIALS = ["<pad>", "<unk>", "<s>", "</s>", "<image>"]
# Template words beyond colours, shapes, sizes and counts; punctuation is split off by the pre-tokenizer.
TEMPLATE_WORDS = (
    "a an and shape shapes what color is the object there how many are size on left right yes no describe name "
    "question answer : ? = > - | ,"
).split()


def words() -> list[str]:
    found = set(TEMPLATE_WORDS) | set(synthetic.COLORS) | set(synthetic.SHAPES) | set(synthetic.SIZES)
    return sorted(found | set(synthetic.COUNTS))


def bert_tokenizer() -> BertTokenizer:
    """BLIP's tokenizer: [DEC] starts decoder text, [ENC] marks encoder text fused with the image."""
    vocab = {token: i for i, token in enumerate(BERT_SPECIALS + words())}
    tokenizer = BertTokenizer(vocab=vocab, do_lower_case=True)
    tokenizer.add_special_tokens({"bos_token": "[DEC]", "additional_special_tokens": ["[ENC]"]})
    return tokenizer


def lm_tokenizer(append_eos: bool = False) -> PreTrainedTokenizerFast:
    """Language models' tokenizer: <s> is prepended, </s> ends a target, padding on the left for generation.
    ``append_eos``: every text ends with </s> (CLIP pools its text at that token)."""
    vocab = {token: i for i, token in enumerate(LM_SPECIALS + words())}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.normalizer = normalizers.Lowercase()
    backend.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    single = "<s> $A </s>" if append_eos else "<s> $A"
    backend.post_processor = processors.TemplateProcessing(
        single=single, special_tokens=[("<s>", vocab["<s>"]), ("</s>", vocab["</s>"])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>",
        padding_side="left",
    )
