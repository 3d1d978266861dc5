"""Build a stand-in OPT tokenizer inside a fake Hugging Face hub cache.

The original FlexGen's CLI (flexgen 0.1.8, flex_opt.run_flexgen) calls
`AutoTokenizer.from_pretrained("facebook/opt-30b", padding_side="left")` and only uses it to
encode "Paris is the capital city of" left-padded to --prompt-len (pad id 1 makes the attention
mask).  The device cannot reach the hub, so with HF_HOME=<root> and HF_HUB_OFFLINE=1 this cache
answers instead: models--facebook--<name>/{refs/main, snapshots/<40 hex>/...}.

The tokenizer is a tiny byte-level BPE (GPT-2 style, the OPT tokenizer's kind) that encodes the
prompt as OPT does: 7 ids, "</s>" (id 2) first, then one id per word.  Ids of OPT's specials:
<s>=0, <pad>=1, </s>=2, <unk>=3.  The token ids of the words differ from OPT's; with dummy
weights only the count of real (non-pad) tokens matters, and it is the same (7).

Usage: python3 make_tokenizer.py HUB_DIR   (HUB_DIR = $HF_HOME/hub); needs `tokenizers`.
"""
import hashlib
import json
import os
import sys

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

PROMPT = "Paris is the capital city of"
SPECIALS = ["<s>", "<pad>", "</s>", "<unk>"]  # OPT's ids 0..3

# OPT configs as on the hub (used only if some code reads config.json; FlexGen 0.1.8 has its own table).
CONFIGS = {
    "opt-30b": dict(hidden_size=7168, num_hidden_layers=48, num_attention_heads=56, ffn_dim=28672,
                    word_embed_proj_dim=7168),
    "opt-6.7b": dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, ffn_dim=16384,
                     word_embed_proj_dim=4096),
}


def build_tokenizer():
    tok = Tokenizer(models.BPE(unk_token=None, continuing_subword_prefix="", end_of_word_suffix="",
                               fuse_unk=False))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=1000, min_frequency=1, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator([PROMPT] * 16, trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="</s> $A", pair="</s> $A </s> $B", special_tokens=[("</s>", 2)])
    return tok


def write_repo(hub_dir, name, tok):
    repo = f"facebook/{name}"
    commit = hashlib.sha1(f"flexgen-standin-{repo}".encode()).hexdigest()
    base = os.path.join(hub_dir, f"models--facebook--{name}")
    snap = os.path.join(base, "snapshots", commit)
    os.makedirs(snap, exist_ok=True)
    os.makedirs(os.path.join(base, "refs"), exist_ok=True)
    with open(os.path.join(base, "refs", "main"), "w") as f:
        f.write(commit)
    tok.save(os.path.join(snap, "tokenizer.json"))
    tcfg = {
        "tokenizer_class": "GPT2Tokenizer",
        "add_bos_token": True, "add_eos_token": False, "add_prefix_space": False,
        "bos_token": "</s>", "eos_token": "</s>", "unk_token": "</s>", "pad_token": "<pad>",
        "errors": "replace", "model_max_length": 1000000000000000019884624838656,
    }
    with open(os.path.join(snap, "tokenizer_config.json"), "w") as f:
        json.dump(tcfg, f, indent=2)
    with open(os.path.join(snap, "special_tokens_map.json"), "w") as f:
        json.dump({"bos_token": "</s>", "eos_token": "</s>", "unk_token": "</s>", "pad_token": "<pad>"}, f,
                  indent=2)
    cfg = dict(architectures=["OPTForCausalLM"], model_type="opt", activation_function="relu",
               attention_dropout=0.0, dropout=0.1, do_layer_norm_before=True, enable_bias=True,
               bos_token_id=2, eos_token_id=2, pad_token_id=1, max_position_embeddings=2048,
               vocab_size=50272, torch_dtype="float16", use_cache=True, init_std=0.02,
               layerdrop=0.0, _name_or_path=repo, **CONFIGS[name])
    with open(os.path.join(snap, "config.json"), "w") as f:
        json.dump(cfg, f, indent=2)
    return snap


def main():
    hub_dir = sys.argv[1]
    tok = build_tokenizer()
    enc = tok.encode(PROMPT)
    assert len(enc.ids) == 7 and enc.ids[0] == 2, (enc.ids, enc.tokens)
    assert [tok.token_to_id(s) for s in SPECIALS] == [0, 1, 2, 3]
    for name in CONFIGS:
        print(write_repo(hub_dir, name, tok))
    print("prompt ->", enc.ids, enc.tokens)


if __name__ == "__main__":
    main()
