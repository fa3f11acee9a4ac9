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
import os
import sys

from config_utils import ConfigError, UserError, check_writable, parse_config, run_cli
from answer_format import DEFAULT_INSTRUCT
from dataset import QUERY_PREFIX, DataError, check_prompt_style, encode_prompt, encode_text, read_text
from files import write_json
from quantization import check_quantization_name

BANNER = """+ 该模式下仅支持单轮问答，无多轮对话能力。空行、Ctrl-D 或 Ctrl-C 退出。
+ This mode only supports single-turn QA. An empty line, Ctrl-D or Ctrl-C quits.
=====================================================================================
"""


DEFAULTS = {
    "base_model": "",  # base model folder; "" = model_dir in the adapter's train_args.json
    "lora_model": "",  # trained adapter folder, or the model folder of a full fine-tune (optional)
    "tokenizer_path": "",  # "" = the adapter's tokenizer, else the base model's
    "with_prompt": False,  # wrap inputs in the training prompt (NER inputs: <instruction>文本：<sentence>)
    "prompt_style": "",  # "" = the adapter's (train_args.json), else alpaca; or llama2_chat, chat_template
    "interactive": False,  # read inputs from the terminal; an empty line, Ctrl-D or Ctrl-C quits
    "data_file": "",  # file mode: one input per line
    "predictions_file": "./predictions.json",  # where file mode writes its outputs (a JSON list)
    "gpus": "0",  # CUDA_VISIBLE_DEVICES for this run, e.g. 0,1
    "only_cpu": False,  # run on the CPU even when a GPU exists
    "max_new_tokens": 128,  # answer budget in tokens
    "batch_size": 8,  # inputs generated together in file mode
    "do_sample": False,  # sample instead of greedy decoding
    "temperature": 0.7,  # sampling only
    "top_p": 0.9,  # sampling only
    "top_k": 40,  # sampling only
    "trust_remote_code": False,  # run code shipped with the model (only for models transformers lacks)
    "quantization": None,  # None: as the adapter was trained (train_args.json), else none; or none, 4bit, 8bit
    "grounded": True,  # NER inputs (文本：... with --with_prompt): answers only name the sentence's substrings and the label set's types
    "eos_penalty": 0.0,  # grounded: logit taken from EOS where an answer could end; >0 lists more entities (README)
}


def parse_args(argv=None):
    """The original chat script's flags (`--base_model X --with_prompt --interactive`), parsed
    strictly by config_utils like every script of the project."""
    args = parse_config(DEFAULTS, argv)
    if not args.interactive and not args.data_file:
        raise ConfigError("give --interactive or --data_file=<one input per line>")
    if not args.base_model and not args.lora_model:
        raise ConfigError("give --base_model and/or --lora_model")
    for key in ("max_new_tokens", "batch_size"):
        if args[key] < 1:
            raise ConfigError(f"config key '{key}': {args[key]} must be at least 1")
    if args.prompt_style:
        check_prompt_style(args.prompt_style)
    if args.quantization is not None:
        check_quantization_name(args.quantization)
    # Sampling values transformers would reject only at the first generation, after the load.
    if args.do_sample and args.temperature <= 0:
        raise ConfigError(f"config key 'temperature': {args.temperature} must be above 0 with --do_sample "
                          f"(greedy decoding is --do_sample=False)")
    if args.top_k < 0:
        raise ConfigError(f"config key 'top_k': {args.top_k} must be 0 (off) or more")
    if not 0 < args.top_p <= 1:
        raise ConfigError(f"config key 'top_p': {args.top_p} must lie in (0, 1]")
    return args


def _split(text):
    """(cleaned text, (instruction, sentence) if it is an NER input `[instruction]文本：<sentence>`
    else None): one reading for the prompt and for grounding, so both see the same sentence."""
    text = text.strip().removeprefix("\ufeff").strip()
    if QUERY_PREFIX not in text:
        return text, None
    instruct, _, sentence = text.partition(QUERY_PREFIX)
    return text, (instruct.strip(), sentence.strip())


def prompt_ids(tokenizer, text, with_prompt, default_instruct=None, style="alpaca"):
    """Token ids for one input. `<instruction>文本：<sentence>` is split as training joined it (a bare
    `文本：<sentence>` gets `default_instruct`); any other text is the whole instruction."""
    text, ner = _split(text)
    if not with_prompt:
        bos = [] if tokenizer.bos_token_id is None else [tokenizer.bos_token_id]
        return bos + encode_text(tokenizer, text)
    if ner:
        instruct, sentence = ner
        return encode_prompt(tokenizer, instruct or default_instruct or DEFAULT_INSTRUCT, QUERY_PREFIX + sentence,
                             style)
    return encode_prompt(tokenizer, text, style=style)


def ner_sentence(text):
    """The sentence of an NER input (`[instruction]文本：<sentence>`), else None."""
    ner = _split(text)[1]
    return ner[1] if ner else None


class Chat:
    def __init__(self, args):
        from infer_config import answer_format_for, instruct_for, label_names_for
        from model_utils import load_for_inference
        from generation import generate

        self._generate = generate
        self.args = args
        self.model, self.tokenizer, train_args = load_for_inference(
            args.lora_model or None, model_dir=args.base_model or None, tokenizer_path=args.tokenizer_path or None,
            device="cpu" if args.only_cpu else "auto", trust_remote_code=args.trust_remote_code,
            quantization=args.quantization, merge_lora=True, prompt_style=args.prompt_style or None,
        )
        recorded = train_args.get("prompt_style", "alpaca")
        if args.prompt_style and train_args and args.prompt_style != recorded:
            raise UserError(f"--prompt_style {args.prompt_style}: adapter '{args.lora_model}' was trained with "
                            f"prompt_style {recorded}")
        self.style = check_prompt_style(args.prompt_style or recorded, self.tokenizer)
        self.instruct = instruct_for(train_args)  # for a bare `文本：<sentence>`
        self.label_names = label_names_for(train_args)  # the types grounded answers may name
        self.answer_format = answer_format_for(train_args)  # the answers' grammar
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
            ids = prompt_ids(self.tokenizer, text, self.args.with_prompt, self.instruct, self.style)
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
                grounding = Grounding(sentences, self.label_names, eos_penalty=self.args.eos_penalty,
                                      answer_format=self.answer_format)
        return self._generate(self.model, self.tokenizer, prompts, max_new_tokens=self.args.max_new_tokens,
                              batch_size=self.args.batch_size, max_prompt_tokens=self.max_prompt,
                              grounding=grounding, **self.sampling)


def read_input(lineno):
    """One typed (or piped) line as UTF-8, whatever the locale says; EOFError at the end. A line
    is decoded on its own, so a byte that is not UTF-8 is named with its line and place."""
    print("Input:", end="", flush=True)
    data = sys.stdin.buffer.readline()
    if not data:
        raise EOFError
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"stdin: input line {lineno} is not UTF-8 (byte 0x{data[e.start]:02x} at byte {e.start}); "
                        f"type or pipe UTF-8 text") from None


def interactive(chat):
    print(BANNER, flush=True)
    lineno = 0
    while True:
        lineno += 1
        try:
            text = read_input(lineno).strip()
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
    write_json(predictions_file, results)
    print(f"wrote {len(results)} responses to {predictions_file}")
    return results


def run(args):
    inputs = None
    if args.data_file:
        inputs = read_inputs(args.data_file)  # checked before the model loads
        check_writable(args.predictions_file, "predictions_file", folder=False)
    chat = Chat(args)
    if args.interactive:
        interactive(chat)
    else:
        file_mode(chat, inputs, args.predictions_file)


def main(argv=None):
    def start():
        args = parse_args(argv)
        if not args.only_cpu:
            os.environ.setdefault("CUDA_VISIBLE_DEVICES", args.gpus)
        run(args)

    run_cli(start)


if __name__ == "__main__":
    main()
