"""`reso-hf viz --output_dir DIR [--model DIR --text TEXT]`: PNGs of the crystalline components (issue 17)."""

from __future__ import annotations


def run_viz(args) -> int:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .plots import write_figures

    model = tokenizer = None
    if args.model is not None:
        model = AutoModelForCausalLM.from_pretrained(args.model, trust_remote_code=args.trust_remote_code)
        tokenizer = AutoTokenizer.from_pretrained(args.model, trust_remote_code=args.trust_remote_code)
    for path in write_figures(args.output_dir, model, tokenizer, args.text):
        print(f"Wrote {path}")
    return 0


def add_parser(subparsers) -> None:
    viz = subparsers.add_parser(
        "viz", help="write PNGs of the geometric activations, the coherence field and phase-space trajectories",
        description="Always writes activation_responses.png (each Platonic-solid activation beside SiLU). With "
                    "--model (a saved ResoLLM with kuramoto=True) also coherence_field.png (r_t per layer x "
                    "position of --text) and phase_space_trajectories.png (each layer's mean field z_t).")
    viz.add_argument("--output_dir", "--output-dir", required=True, help="folder for the PNG files")
    viz.add_argument("--model", default=None, help="saved ResoLLM folder (or Hub id)")
    viz.add_argument("--text", default="### Human: What is resonance?### Assistant: Shared rhythm.",
                     help="the text whose coherence field and trajectories are drawn")
    viz.add_argument("--trust_remote_code", "--trust-remote-code", action="store_true",
                     help="allow the model's own code (trusted folders only)")
    viz.set_defaults(func=run_viz)
