"""Single-turn chat with the base model plus an optional NER adapter (interactive or file mode).

    python chat_ner.py --base_model ./model_hub/chinese-alpaca-7b --with_prompt --interactive
    python chat_ner.py --lora_model ./checkpoint/msra/train_trainer/adapter_model --with_prompt --interactive
    python chat_ner.py --lora_model ... --with_prompt --data_file inputs.txt --predictions_file out.json

With --with_prompt an input is wrapped in the training template by the same `build_prompt`
as training: `<instruction>文本：<sentence>` is split into instruction and query exactly as
training joined them (a bare `文本：<sentence>` gets the default NER instruction); any other
input is a plain Alpaca instruction. Decoding is greedy unless --do_sample is given (no
repetition penalty: NER answers copy words from the input on purpose).
"""
import argparse
import json
import os
import sys

from config_utils import UserError, run_cli
from dataset import DEFAULT_INSTRUCT, QUERY_PREFIX, encode_prompt

BANNER = """+ 该模式下仅支持单轮问答，无多轮对话能力。空行、Ctrl-D 或 Ctrl-C 退出。
+ This mode only supports single-turn QA. An empty line, Ctrl-D or Ctrl-C quits.
=====================================================================================
"""


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--base_model", default=None, help="base model dir (default: the adapter's train_args.json)")
    p.add_argument("--lora_model", default=None, help="trained adapter folder, or the model folder of a full fine-tune (optional)")
    p.add_argument("--tokenizer_path", default=None, help="default: the adapter's, else the base model's")
    p.add_argument("--with_prompt", action="store_true", help="wrap inputs in the training prompt template")
    p.add_argument("--interactive", action="store_true", help="read inputs from the terminal")
    p.add_argument("--data_file", default=None, help="one input per line")
    p.add_argument("--predictions_file", default="./predictions.json", help="where file mode writes its outputs")
    p.add_argument("--gpus", default="0", help="CUDA_VISIBLE_DEVICES for this run, e.g. 0,1")
    p.add_argument("--only_cpu", action="store_true", help="run on the CPU even when a GPU exists")
    p.add_argument("--max_new_tokens", type=int, default=128)
    p.add_argument("--batch_size", type=int, default=8, help="inputs generated together in file mode")
    p.add_argument("--do_sample", action="store_true", help="sample instead of greedy decoding")
    p.add_argument("--temperature", type=float, default=0.7)
    p.add_argument("--top_p", type=float, default=0.9)
    p.add_argument("--top_k", type=int, default=40)
    args = p.parse_args(argv)
    if not args.interactive and not args.data_file:
        p.error("give --interactive or --data_file")
    if not args.base_model and not args.lora_model:
        p.error("give --base_model and/or --lora_model")
    return args


def prompt_ids(tokenizer, text, with_prompt):
    if not with_prompt:
        return [tokenizer.bos_token_id] + tokenizer.encode(text, add_special_tokens=False)
    if QUERY_PREFIX in text:
        instruct, _, sentence = text.partition(QUERY_PREFIX)
        return encode_prompt(tokenizer, instruct.strip() or DEFAULT_INSTRUCT, QUERY_PREFIX + sentence.strip())
    return encode_prompt(tokenizer, text)


class Chat:
    def __init__(self, args):
        from model_utils import generate, load_for_inference

        self._generate = generate
        self.args = args
        self.model, self.tokenizer, _ = load_for_inference(
            args.lora_model, model_dir=args.base_model, tokenizer_path=args.tokenizer_path,
            device="cpu" if args.only_cpu else "auto",
        )
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
            ids = prompt_ids(self.tokenizer, text, self.args.with_prompt)
            if len(ids) > self.max_prompt:
                print(f"warning: input is {len(ids)} tokens; keeping the last {self.max_prompt} to fit the "
                      f"model's context", file=sys.stderr)
            prompts.append(ids)
        return self._generate(self.model, self.tokenizer, prompts, max_new_tokens=self.args.max_new_tokens,
                              batch_size=self.args.batch_size, max_prompt_tokens=self.max_prompt, **self.sampling)


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


def file_mode(chat, data_file, predictions_file):
    with open(data_file, encoding="utf-8") as f:
        inputs = [line.strip() for line in f if line.strip()]
    outputs = chat.respond(inputs)
    results = [{"id": i, "input": text, "output": out} for i, (text, out) in enumerate(zip(inputs, outputs))]
    with open(predictions_file, "w", encoding="utf-8") as f:
        json.dump(results, f, ensure_ascii=False, indent=2)
    print(f"wrote {len(results)} responses to {predictions_file}")
    return results


def run(args):
    if args.data_file:
        if not os.path.isfile(args.data_file):
            raise UserError(f"{args.data_file}: no such file")
        try:
            open(args.data_file, encoding="utf-8").read()
        except UnicodeDecodeError as e:
            raise UserError(f"{args.data_file}: not UTF-8 ({e.reason})") from None
        out_dir = os.path.dirname(os.path.abspath(args.predictions_file))
        if not os.path.isdir(out_dir):
            raise UserError(f"--predictions_file: folder {out_dir} does not exist")
    chat = Chat(args)
    if args.interactive:
        interactive(chat)
    else:
        file_mode(chat, args.data_file, args.predictions_file)


def main(argv=None):
    args = parse_args(argv)
    if not args.only_cpu:
        os.environ.setdefault("CUDA_VISIBLE_DEVICES", args.gpus)
    run_cli(lambda: run(args))


if __name__ == "__main__":
    main()
