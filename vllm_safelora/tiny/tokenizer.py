"""The tiny byte-level BPE tokenizer, trained on a small generated corpus, with its chat template."""

from __future__ import annotations

import json
import random
from pathlib import Path

from .architecture import TINY_LLAMA_CONFIG, TINY_VOCAB_SIZE

SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<pad>", "<|system|>", "<|user|>", "<|assistant|>"]
UNK, BOS, EOS, PAD = SPECIAL_TOKENS[:4]

TINY_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}<|system|> {{ message['content'] }}\n"
    "{% elif message['role'] == 'user' %}<|user|> {{ message['content'] }}\n"
    "{% else %}<|assistant|> {{ message['content'] }}{{ eos_token }}\n"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)

_WORDS = (
    "the a an this that my your our their some every no one two three many few "
    "cat dog bird fish model river city house tree stone cloud robot teacher student "
    "friend doctor garden window door road book letter song story question answer "
    "safety rule help request task plan idea reason problem result number word "
    "is are was were will can could should would may might must do does did "
    "run walk read write sing think know see find make take give tell ask answer "
    "explain help learn build open close start stop keep change move turn "
    "big small red blue green old new good bad happy sad quick slow bright dark "
    "safe careful honest kind simple clear long short warm cold "
    "and or but because so if when while then also very not always never often "
    "in on at to from with without about over under after before into "
    "i you he she it we they me him her us them what why how where who which "
    "hello please thanks sorry yes okay sure"
).split()


def _corpus(seed: int, n: int = 1500) -> list[str]:
    rng = random.Random(seed)
    lines = []
    for _ in range(n):
        k = rng.randint(4, 14)
        words = [rng.choice(_WORDS) for _ in range(k)]
        s = " ".join(words)
        s = s[0].upper() + s[1:] + rng.choice([".", ".", ".", "?", "!", ","])
        if rng.random() < 0.15:
            s += f" {rng.randint(0, 999)}"
        lines.append(s)
    return lines


def _build_tokenizer_object(seed: int = 0):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE(unk_token=None, fuse_unk=False, byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TINY_VOCAB_SIZE,
        min_frequency=2,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(seed), trainer=trainer)
    bos_id = tok.token_to_id(BOS)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, bos_id)]
    )
    return tok


def make_tiny_tokenizer(out_dir: Path | None = None, *, seed: int = 0):
    """Build the tiny byte-level BPE tokenizer (with chat template); save it if out_dir."""
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast(
        tokenizer_object=_build_tokenizer_object(seed),
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        unk_token=UNK,
        additional_special_tokens=SPECIAL_TOKENS[4:],
        model_max_length=TINY_LLAMA_CONFIG["max_position_embeddings"],
        padding_side="left",
        clean_up_tokenization_spaces=False,
        chat_template=TINY_CHAT_TEMPLATE,
    )
    if out_dir is not None:
        save_tokenizer(tok, Path(out_dir))
    return tok


def save_tokenizer(tok, out_dir: Path) -> None:
    tok.save_pretrained(str(out_dir))
    # transformers 5 writes "TokenizersBackend", which 4.x cannot resolve; both
    # resolve "PreTrainedTokenizerFast" (5.x aliases it to the same backend).
    cfg_path = Path(out_dir) / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
