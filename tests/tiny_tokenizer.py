"""A small byte-level BPE tokenizer for the tiny random checkpoints, so that text-level
integrations (lm-eval, OpenAI batch files) run on them. Trained on a fixed English text with the
`tokenizers` library (deterministic), saved next to a checkpoint as a Hugging Face fast tokenizer
(tokenizer.json + tokenizer_config.json), so both our loader and transformers' AutoTokenizer read it.

Special ids follow each family's transformers config defaults: LLaMA <unk>=0 <s>=1 </s>=2
(pad = 0, BOS prepended); OPT <unk>=0 <pad>=1 </s>=2 (BOS = EOS = </s>, prepended, as OPT's own
tokenizer does)."""
from __future__ import annotations

import os

CORPUS = """The quick brown fox jumps over the lazy dog. Paris is the capital of France. Berlin is the
capital of Germany. Question: What color is the sky? Answer: blue. Question: How many legs does a cat
have? Answer: four. One, two, three, four, five, six, seven, eight, nine, ten. The sun rises in the
east and sets in the west. Water boils at one hundred degrees. A dog is an animal; a rose is a flower.
Once upon a time there was a small town by the sea where people fished and sang songs at night.
user assistant system: hello, how are you? I am fine, thank you. red green yellow orange purple.
"""

CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>{% endif %}")


def save_tiny_tokenizer(directory, family: str, vocab_size: int = 320) -> str:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<unk>", "<s>", "</s>"] if family == "llama" else ["<unk>", "<pad>", "</s>"]
    bos = "<s>" if family == "llama" else "</s>"
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([CORPUS] * 4, trainer)
    tok.post_processor = processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A $B",
                                                       special_tokens=[(bos, tok.token_to_id(bos))])
    assert tok.get_vocab_size() <= vocab_size, tok.get_vocab_size()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token=bos, eos_token="</s>",
                                   pad_token="<unk>" if family == "llama" else "<pad>")
    fast.chat_template = CHAT_TEMPLATE
    os.makedirs(directory, exist_ok=True)
    fast.save_pretrained(directory)
    return str(directory)
