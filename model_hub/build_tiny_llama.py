"""Build the embedded test model: a tiny random LLaMA with a SentencePiece tokenizer trained on MSRA.

    python model_hub/build_tiny_llama.py [--output_dir=model_hub/tiny-llama]

    python model_hub/build_tiny_llama.py --tokenizer_type=char --tie_word_embeddings=True \
        --output_dir=model_hub/tiny-llama-char          # the model `make demo` trains from scratch

The tokenizer is trained on MSRA training sentences plus the prompt template and instruction,
with LLaMA's conventions (<unk>/<s>/</s> = 0/1/2, byte fallback, digits split). `bpe` (the
default, what the tests use) makes prompts about as many tokens as the real Chinese-LLaMA
tokenizer; `char` gives one piece per character (plus the template's English words), so entity
boundaries fall on token boundaries and copying an entity is one token per character, which
is what lets a model trained from nothing on a CPU learn NER in minutes (docs/demo.md).
The model is a randomly initialised `LlamaForCausalLM` of about 1.4-2.5M parameters: with LoRA
it proves the plumbing (it can memorise a few examples); trained in full on all of MSRA it
learns real NER. Seeded: the same command gives the same model.
"""
import re
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from config_utils import ConfigError, parse_config, run_cli  # noqa: E402
from answer_format import DEFAULT_INSTRUCT  # noqa: E402
from dataset import QUERY_PREFIX, build_prompt  # noqa: E402
from files import share_files  # noqa: E402

DEFAULTS = {
    "output_dir": str(ROOT / "model_hub" / "tiny-llama"),
    "num_sentences": 20000,  # MSRA training sentences the tokenizer learns from
    "tokenizer_type": "bpe",  # bpe: LLaMA-like pieces (tests); char: one piece per character (the demo)
    "vocab_size": 8000,  # pieces (bpe); for char, an upper bound: the characters that cover 99.95% of the text
    "hidden_size": 128,
    "intermediate_size": 352,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "max_position_embeddings": 1024,  # tokens; MSRA prompts stay under 400
    "tie_word_embeddings": False,  # True: lm_head shares the embedding matrix (saves vocab x hidden parameters)
    "seed": 0,
    "overwrite": False,
}


def check_tokenizer_type(tokenizer_type):
    if tokenizer_type not in ("bpe", "char"):
        raise ConfigError(f"config key 'tokenizer_type': {tokenizer_type!r} is not bpe or char")


def template_words():
    """The prompt template's English words (and `###`): user-defined pieces of the char tokenizer."""
    return sorted({w for w in re.findall(r"[A-Za-z#]+", build_prompt(DEFAULT_INSTRUCT, QUERY_PREFIX)) if len(w) > 1})


def train_tokenizer(texts, output_dir, vocab_size, seed=0, tokenizer_type="bpe"):
    """SentencePiece model with LLaMA's special ids; returns an HF LlamaTokenizer saved in output_dir.

    bpe: as LLaMA's. char: every character is a piece; the template's English words are
    user-defined pieces so the template stays short (it is in every example).
    """
    check_tokenizer_type(tokenizer_type)
    import sentencepiece as spm
    from transformers import LlamaTokenizer

    # The template and instruction appear in every example; one copy per 5 sentences lets
    # their words become pieces, as in LLaMA's English-trained vocabulary. Measured on MSRA:
    # shared prefix 71 tokens, prompt 111, answer 9.5 (Chinese-LLaMA: about 82-87, 117, 10).
    prompt_text = build_prompt(DEFAULT_INSTRUCT, QUERY_PREFIX)
    corpus = list(texts) + [prompt_text] * max(1, len(texts) // 5)
    with tempfile.TemporaryDirectory() as tmp:
        corpus_file = Path(tmp) / "corpus.txt"
        corpus_file.write_text("\n".join(line.replace("\n", " ") for line in corpus), encoding="utf-8")
        spm.SentencePieceTrainer.train(
            input=str(corpus_file), model_prefix=str(Path(tmp) / "tokenizer"), vocab_size=vocab_size,
            model_type=tokenizer_type, character_coverage=0.9995,
            # char: vocab_size is only an upper bound (the covered characters decide the size).
            hard_vocab_limit=tokenizer_type == "bpe",
            user_defined_symbols=template_words() if tokenizer_type == "char" else [], byte_fallback=True, split_digits=True,
            unk_id=0, bos_id=1, eos_id=2, pad_id=-1, seed_sentencepiece_size=200000,
            num_threads=2, minloglevel=2,
            shuffle_input_sentence=False, remove_extra_whitespaces=False,
        )
        Path(output_dir).mkdir(parents=True, exist_ok=True)
        tokenizer = LlamaTokenizer.from_pretrained(tmp, legacy=True)
        tokenizer.save_pretrained(output_dir)
    return tokenizer


def build_model(tokenizer, output_dir, cfg):
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(cfg["seed"])
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=cfg["hidden_size"],
        intermediate_size=cfg["intermediate_size"], num_hidden_layers=cfg["num_hidden_layers"],
        num_attention_heads=cfg["num_attention_heads"], num_key_value_heads=cfg["num_attention_heads"],
        max_position_embeddings=cfg["max_position_embeddings"], rms_norm_eps=1e-6,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=cfg["tie_word_embeddings"],
    )
    model = LlamaForCausalLM(config)
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, do_sample=False
    )
    model.save_pretrained(output_dir)
    share_files(output_dir)  # safetensors writes 0600
    return model


def build(texts, output_dir, **overrides):
    """Tokenizer + model into output_dir from the given sentences (tests call this directly)."""
    cfg = {**DEFAULTS, **overrides}
    tokenizer = train_tokenizer(texts, output_dir, cfg["vocab_size"], cfg["seed"], cfg["tokenizer_type"])
    model = build_model(tokenizer, output_dir, cfg)
    return model, tokenizer


def main(argv=None):
    import process

    cfg = parse_config(DEFAULTS, argv)
    check_tokenizer_type(cfg.tokenizer_type)  # before the corpus is read
    out = Path(cfg.output_dir)
    if (out / "config.json").exists() and not cfg.overwrite:
        print(f"{out} already holds a model; pass --overwrite to rebuild it")
        return out
    labels = process.parse_label_names(process.DEFAULTS["label_names"])
    sentences = process.read_tagged(process.msra_path(), labels)[:process.MSRA_TRAIN_SENTENCES]
    texts = [s["text"] for s in sentences[:cfg.num_sentences]]
    model, tokenizer = build(texts, out, **{k: v for k, v in cfg.to_dict().items() if k != "output_dir"})
    n_params = sum(p.numel() for p in model.parameters())
    print(f"wrote {out}: {n_params / 1e6:.2f}M parameters, vocabulary {len(tokenizer)}")
    return out


if __name__ == "__main__":
    run_cli(main)
