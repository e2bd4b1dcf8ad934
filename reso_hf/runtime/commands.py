"""`reso-hf chat` and `reso-hf generate`."""

import json


def _load(model: str):
    from ..loading import load_causal_lm, load_tokenizer, resolve_model_source

    source = resolve_model_source(model, field="--model")
    return load_causal_lm(source), load_tokenizer(source)


def _engine(args):
    from .inference import ResoLLMInference

    model, tokenizer = _load(args.model)
    return ResoLLMInference(model, tokenizer, temperature=args.temperature, do_sample=not args.greedy,
                            top_k=args.top_k)


def run_chat(args) -> int:
    from .chat import ChatSession

    return ChatSession(_engine(args), show_metrics=not args.no_metrics, max_new_tokens=args.max_new_tokens).run()


def run_generate(args) -> int:
    engine = _engine(args)
    result = engine.generate(args.prompt, max_length=args.max_new_tokens, seed=args.seed)
    print(result.text)
    if args.metrics:
        fields = {name: value for name, value in vars(result).items() if name not in ("text",)}
        print(json.dumps(fields, indent=None))
    return 0


def _common(parser):
    parser.add_argument("--model", required=True,
                        help="causal LM to load: a model folder (save_pretrained output with its tokenizer), a .gguf "
                             "file, a PEFT adapter folder (LoRA or DynamicLoRA; its adapter_config.json names the "
                             "base model), or a Hub id; ResoLLM telemetry is shown when the model is a ResoLLM")
    parser.add_argument("--max_new_tokens", type=int, default=128, help="new tokens per answer (default 128)")
    parser.add_argument("--temperature", type=float, default=0.7, help="sampling temperature (default 0.7)")
    parser.add_argument("--top_k", type=int, default=50, help="top-k sampling (default 50)")
    parser.add_argument("--greedy", action="store_true", help="greedy decoding instead of sampling")


def add_parser(subparsers) -> None:
    chat = subparsers.add_parser("chat", help="interactive chat (commands: exit, goal <d>, status, metrics)")
    _common(chat)
    chat.add_argument("--no_metrics", action="store_true", help="start with the metrics display off")
    chat.set_defaults(func=run_chat)

    generate = subparsers.add_parser("generate", help="generate a continuation of --prompt")
    _common(generate)
    generate.add_argument("--prompt", required=True, help="text to continue")
    generate.add_argument("--seed", type=int, default=None, help="seed for sampling and stochastic resonance")
    generate.add_argument("--metrics", action="store_true", help="also print the telemetry as one JSON line")
    generate.set_defaults(func=run_generate)
