"""`reso-hf chat` and `reso-hf generate`."""

import json

# The ConversationMemory defaults (tuned on the dev facts of benchmarks/memory_layers.py): the chat's flags too.
MEMORY_DEFAULTS = {"steps_per_turn": 4, "lr": 3e-4, "rank": 8, "layers": 8, "decay": 0.8, "max_layers": 8}


def _load(model: str):
    from ..loading import load_causal_lm, load_tokenizer, resolve_model_source

    source = resolve_model_source(model, field="--model")
    return load_causal_lm(source), load_tokenizer(source)


def _engine(args):
    from .inference import ResoLLMInference

    model, tokenizer = _load(args.model)
    return ResoLLMInference(model, tokenizer, temperature=args.temperature, do_sample=not args.greedy,
                            top_k=args.top_k)


def _check_memory_args(args) -> None:
    """Clear errors naming the flag before the model loads."""
    if args.memory is None:
        given = [flag for flag in ("memory_session",) if getattr(args, flag) is not None]
        if given:
            raise ValueError(f"--{given[0]} needs --memory DIR")
        return
    for flag in ("memory_steps", "memory_rank", "memory_layers", "memory_max_layers"):
        if getattr(args, flag) < 1:
            raise ValueError(f"--{flag} must be >= 1, got {getattr(args, flag)}")
    if not args.memory_lr > 0:
        raise ValueError(f"--memory_lr must be > 0, got {args.memory_lr}")
    if not 0 < args.memory_decay <= 1:
        raise ValueError(f"--memory_decay must be in (0, 1], got {args.memory_decay}")
    if not -1 <= args.memory_min_similarity <= 1:
        raise ValueError(f"--memory_min_similarity must be in [-1, 1] (a cosine), got "
                         f"{args.memory_min_similarity}")


def run_chat(args) -> int:
    from .chat import ChatSession
    from .inference import ResoLLMInference

    _check_memory_args(args)
    if args.memory is None:
        return ChatSession(_engine(args), show_metrics=not args.no_metrics, max_new_tokens=args.max_new_tokens).run()
    from ..conversation_memory import ConversationMemory, check_session_name

    if args.memory_session is not None:
        try:
            check_session_name(args.memory_session)
        except ValueError as error:
            raise ValueError(f"--memory_session: {error}") from error
    model, tokenizer = _load(args.model)
    layer_count = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    if layer_count is not None:
        args.memory_layers = min(args.memory_layers, layer_count)
    memory = ConversationMemory(model, tokenizer, args.memory, steps_per_turn=args.memory_steps, lr=args.memory_lr,
                                rank=args.memory_rank, layers=args.memory_layers, decay=args.memory_decay,
                                max_layers=args.memory_max_layers,
                                session=args.memory_session)
    resume = args.memory_session is not None
    if resume and args.memory_session in memory.sessions():
        memory.load(args.memory_session)
    engine = ResoLLMInference(memory.model, tokenizer, temperature=args.temperature, do_sample=not args.greedy,
                              top_k=args.top_k)
    return ChatSession(engine, show_metrics=not args.no_metrics, max_new_tokens=args.max_new_tokens, memory=memory,
                       memory_min_similarity=args.memory_min_similarity, resume_session=resume).run()


def run_generate_cached(args) -> int:
    """`reso-hf generate --cache DIR`: the generation goes through a WaveGen cache kept in DIR (see reso_hf.wavegen)."""
    import os
    import sys

    import torch

    from ..wavegen import CACHE_FILE, WaveGenCache
    from .inference import check_generating_model, check_max_length, fit_new_tokens

    if not args.greedy and args.seed is None:
        raise ValueError("--cache caches only deterministic decoding: add --greedy, or --seed N for sampling with a "
                         "fixed seed.")
    if args.metrics:
        raise ValueError("--metrics needs a run of the model, which a cache hit skips: use it without --cache.")
    model, tokenizer = _load(args.model)
    check_generating_model(model).eval()
    encoded = tokenizer(args.prompt, return_tensors="pt")
    input_ids = encoded["input_ids"].to(model.device)
    if input_ids.shape[1] == 0:
        raise ValueError("--prompt encodes to no tokens: give a non-empty prompt.")
    max_new_tokens, _ = fit_new_tokens(model, input_ids.shape[1], check_max_length(args.max_new_tokens,
                                                                                     "--max_new_tokens"))
    exists = os.path.isfile(os.path.join(args.cache, CACHE_FILE))
    cache = WaveGenCache.from_pretrained(args.cache, tokenizer=tokenizer) if exists else WaveGenCache(
        tokenizer=tokenizer)
    kwargs = dict(max_new_tokens=max_new_tokens, do_sample=not args.greedy,
                  pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else model.config.pad_token_id)
    if tokenizer.eos_token_id is not None:
        kwargs["eos_token_id"] = tokenizer.eos_token_id
    if not args.greedy:
        kwargs.update(temperature=args.temperature, top_k=args.top_k)
    output = cache.generate(model, input_ids, attention_mask=torch.ones_like(input_ids),
                            seed=None if args.greedy else args.seed, **kwargs)
    print(tokenizer.decode(output[0, input_ids.shape[1]:].tolist(), skip_special_tokens=True))
    cache.save_pretrained(args.cache)
    stats = cache.stats()
    print(f"[wavegen] {cache.last_event['result']} (entries={stats['entries']}, hits={stats['hits']}, "
          f"lookups={stats['lookups']})", file=sys.stderr)
    return 0


def run_generate(args) -> int:
    if args.cache is not None:
        return run_generate_cached(args)
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
    memory = chat.add_argument_group("conversation memory (README: Conversation memory layers)")
    memory.add_argument("--memory", default=None, metavar="DIR",
                        help="train a memory layer (a small adapter) on this conversation and save it in "
                             "DIR/<session>/; the first message recalls the closest saved layer")
    memory.add_argument("--memory_session", default=None,
                        help="session name: continue it when DIR holds it, else start it (default: a new timestamped "
                             "session, or the recalled one)")
    memory.add_argument("--memory_steps", type=int, default=MEMORY_DEFAULTS["steps_per_turn"],
                        help=f"optimizer steps per turn (default {MEMORY_DEFAULTS['steps_per_turn']})")
    memory.add_argument("--memory_lr", type=float, default=MEMORY_DEFAULTS["lr"],
                        help=f"learning rate of the memory layer (default {MEMORY_DEFAULTS['lr']})")
    memory.add_argument("--memory_rank", type=int, default=MEMORY_DEFAULTS["rank"],
                        help=f"rank of the memory adapter (default {MEMORY_DEFAULTS['rank']})")
    memory.add_argument("--memory_layers", type=int, default=MEMORY_DEFAULTS["layers"],
                        help=f"the memory adapts the last K decoder layers (default {MEMORY_DEFAULTS['layers']}, "
                             f"capped at the model's layer count)")
    memory.add_argument("--memory_decay", type=float, default=MEMORY_DEFAULTS["decay"],
                        help=f"recency decay per turn of age, in (0, 1] (default {MEMORY_DEFAULTS['decay']})")
    memory.add_argument("--memory_max_layers", type=int, default=MEMORY_DEFAULTS["max_layers"],
                        help=f"saved layers kept by importance (default {MEMORY_DEFAULTS['max_layers']})")
    memory.add_argument("--memory_min_similarity", type=float, default=0.5,
                        help="cosine to a saved layer's centroid above which the first message recalls it "
                             "(default 0.5)")
    chat.set_defaults(func=run_chat)

    generate = subparsers.add_parser("generate", help="generate a continuation of --prompt")
    _common(generate)
    generate.add_argument("--prompt", required=True, help="text to continue")
    generate.add_argument("--seed", type=int, default=None, help="seed for sampling and stochastic resonance")
    generate.add_argument("--metrics", action="store_true", help="also print the telemetry as one JSON line")
    generate.add_argument("--cache", default=None, metavar="DIR",
                          help="WaveGen cache folder (created if missing): a repeated prompt with the same model, "
                               "adapter and settings is answered from it; needs --greedy or --seed")
    generate.set_defaults(func=run_generate)
