"""Single-turn chat with the base model plus an optional NER adapter (interactive or file mode).

    python chat_ner.py --base_model ./model_hub/chinese-alpaca-7b --with_prompt --interactive
    python chat_ner.py --lora_model ./checkpoint/msra/train_trainer/adapter_model --with_prompt --interactive
    python chat_ner.py --lora_model ... --with_prompt --data_file inputs.txt --predictions_file out.json

With --with_prompt an input is wrapped in the training template by the same `build_prompt`
as training: `<instruction>文本：<sentence>` is split into instruction and query exactly as
training joined them (a bare `文本：<sentence>` gets the default NER instruction); any other
input is a plain Alpaca instruction. Decoding is greedy unless --do_sample is given (no
repetition penalty: NER answers copy words from the input on purpose). NER answers are grounded
(only substrings of the sentence and the label set's types; --grounded=False turns it off).
"""
import argparse
import json
import os
import sys

from config_utils import UserError, run_cli
from dataset import DEFAULT_INSTRUCT, QUERY_PREFIX, atomic_write_text, encode_prompt, read_text

BANNER = """+ 该模式下仅支持单轮问答，无多轮对话能力。空行、Ctrl-D 或 Ctrl-C 退出。
+ This mode only supports single-turn QA. An empty line, Ctrl-D or Ctrl-C quits.
=====================================================================================
"""


def _positive(text):
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} must be at least 1")
    return value


def _boolean(text):
    value = {"true": True, "false": False}.get(text.lower())
    if value is None:
        raise argparse.ArgumentTypeError(f"{text!r} is not True or False")
    return value


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--base_model", default=None, help="base model dir (default: the adapter's train_args.json)")
    p.add_argument("--lora_model", default=None, help="trained adapter folder (optional)")
    p.add_argument("--tokenizer_path", default=None, help="default: the adapter's, else the base model's")
    p.add_argument("--with_prompt", action="store_true", help="wrap inputs in the training prompt template")
    p.add_argument("--interactive", action="store_true", help="read inputs from the terminal")
    p.add_argument("--data_file", default=None, help="one input per line")
    p.add_argument("--predictions_file", default="./predictions.json", help="where file mode writes its outputs")
    p.add_argument("--gpus", default="0", help="CUDA_VISIBLE_DEVICES for this run, e.g. 0,1")
    p.add_argument("--only_cpu", action="store_true", help="run on the CPU even when a GPU exists")
    p.add_argument("--max_new_tokens", type=_positive, default=128)
    p.add_argument("--batch_size", type=_positive, default=8, help="inputs generated together in file mode")
    p.add_argument("--do_sample", action="store_true", help="sample instead of greedy decoding")
    p.add_argument("--temperature", type=float, default=0.7)
    p.add_argument("--top_p", type=float, default=0.9)
    p.add_argument("--top_k", type=int, default=40)
    p.add_argument("--grounded", type=_boolean, nargs="?", const=True, default=True,
                   help="NER inputs (文本：... with --with_prompt): answers only name substrings of the sentence "
                        "and the label set's types; --grounded=False turns it off")
    args = p.parse_args(argv)
    if not args.interactive and not args.data_file:
        p.error("give --interactive or --data_file")
    if not args.base_model and not args.lora_model:
        p.error("give --base_model and/or --lora_model")
    return args


def prompt_ids(tokenizer, text, with_prompt, default_instruct=None):
    """Token ids for one input. `<instruction>文本：<sentence>` is split as training joined it (a bare
    `文本：<sentence>` gets `default_instruct`); any other text is a plain Alpaca instruction."""
    text = text.strip().removeprefix("\ufeff").strip()
    if not with_prompt:
        return [tokenizer.bos_token_id] + tokenizer.encode(text, add_special_tokens=False)
    if QUERY_PREFIX in text:
        instruct, _, sentence = text.partition(QUERY_PREFIX)
        return encode_prompt(tokenizer, instruct.strip() or default_instruct or DEFAULT_INSTRUCT,
                             QUERY_PREFIX + sentence.strip())
    return encode_prompt(tokenizer, text)


def ner_sentence(text):
    """The sentence of an NER input (`[instruction]文本：<sentence>`), else None."""
    text = text.strip().removeprefix("\ufeff").strip()
    return text.partition(QUERY_PREFIX)[2].strip() if QUERY_PREFIX in text else None


class Chat:
    def __init__(self, args):
        from model_utils import generate, instruct_for, label_names_for, load_for_inference

        self._generate = generate
        self.args = args
        self.model, self.tokenizer, train_args = load_for_inference(
            args.lora_model, model_dir=args.base_model, tokenizer_path=args.tokenizer_path,
            device="cpu" if args.only_cpu else "auto",
        )
        self.instruct = instruct_for(train_args)  # for a bare `文本：<sentence>`
        self.label_names = label_names_for(train_args)  # the types grounded answers may name
        # Room for the answer inside the model's context window.
        self.max_prompt = self.model.config.max_position_embeddings - args.max_new_tokens
        if self.max_prompt < 16:
            raise UserError(f"--max_new_tokens {args.max_new_tokens} leaves no room for the input in the "
                            f"model's {self.model.config.max_position_embeddings}-token context")
        self.sampling = {}
        if args.do_sample:
            self.sampling = dict(do_sample=True, temperature=args.temperature, top_p=args.top_p, top_k=args.top_k)

    def respond(self, texts):
        prompts = []
        for text in texts:
            ids = prompt_ids(self.tokenizer, text, self.args.with_prompt, self.instruct)
            if len(ids) > self.max_prompt:
                print(f"warning: input is {len(ids)} tokens; keeping the last {self.max_prompt} to fit the "
                      f"model's context", file=sys.stderr)
            prompts.append(ids)
        grounding = None
        if self.args.grounded and self.args.with_prompt:
            from grounding import Grounding

            # NER inputs only; plain chat stays unconstrained.
            sentences = [ner_sentence(text) for text in texts]
            if any(s is not None for s in sentences):
                grounding = Grounding(sentences, self.label_names)
        return self._generate(self.model, self.tokenizer, prompts, max_new_tokens=self.args.max_new_tokens,
                              batch_size=self.args.batch_size, max_prompt_tokens=self.max_prompt,
                              grounding=grounding, **self.sampling)


def interactive(chat):
    print(BANNER, flush=True)
    while True:
        try:
            text = input("Input:").strip()
        except (EOFError, KeyboardInterrupt):
            print()
            break
        if not text:
            break
        try:
            response = chat.respond([text])[0]
        except KeyboardInterrupt:
            print("\n(interrupted)")
            continue
        print(f"Response:  {response}\n", flush=True)


def read_inputs(data_file):
    inputs = [line.strip() for line in read_text(data_file).splitlines() if line.strip()]
    if not inputs:
        raise UserError(f"{data_file}:1: file holds no input")
    return inputs


def file_mode(chat, inputs, predictions_file):
    outputs = chat.respond(inputs)
    results = [{"id": i, "input": text, "output": out} for i, (text, out) in enumerate(zip(inputs, outputs))]
    atomic_write_text(predictions_file, json.dumps(results, ensure_ascii=False, indent=2) + "\n")
    print(f"wrote {len(results)} responses to {predictions_file}")
    return results


def run(args):
    inputs = None
    if args.data_file:
        inputs = read_inputs(args.data_file)  # checked before the model loads
        out_dir = os.path.dirname(os.path.abspath(args.predictions_file))
        if not os.path.isdir(out_dir):
            raise UserError(f"--predictions_file: folder {out_dir} does not exist")
    chat = Chat(args)
    if args.interactive:
        interactive(chat)
    else:
        file_mode(chat, inputs, args.predictions_file)


def main(argv=None):
    args = parse_args(argv)
    if not args.only_cpu:
        os.environ.setdefault("CUDA_VISIBLE_DEVICES", args.gpus)
    run_cli(lambda: run(args))


if __name__ == "__main__":
    main()
