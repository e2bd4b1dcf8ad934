"""Every combination of the four core switches against transformers' compile/export contracts (issue 18):
static-cache generation equals the dynamic cache's, `torch.compile(fullgraph=True)` and `torch.export` give eager's
logits. The test suite runs four representative combinations; this runs all 16.

    python benchmarks/compile_export_check.py     # about 1-2 min on 2 CPU cores; writes results/compile_export_check.json
"""

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from reso_test_models import ALL_SWITCHES, micro_model, switch_id  # noqa: E402

PROMPT = torch.tensor([[4, 5, 6, 7], [0, 8, 9, 10]])
MASK = torch.tensor([[1, 1, 1, 1], [0, 1, 1, 1]])


def check(switches: dict) -> dict:
    model = micro_model(**switches)
    kwargs = dict(attention_mask=MASK, max_new_tokens=6, do_sample=False, pad_token_id=0)
    static_equal = torch.equal(model.generate(PROMPT, cache_implementation="static", **kwargs),
                               model.generate(PROMPT, **kwargs))
    with torch.no_grad():
        eager = model(PROMPT, attention_mask=MASK, use_cache=False).logits
        torch._dynamo.reset()
        compiled = torch.compile(model, fullgraph=True, backend="eager")(PROMPT, attention_mask=MASK, use_cache=False)
        exported = torch.export.export(model, (PROMPT,), {"attention_mask": MASK, "use_cache": False}).module()(
            PROMPT, attention_mask=MASK, use_cache=False)
    return {"switches": switch_id(switches), "static_cache_equals_dynamic": static_equal,
            "compiled_max_difference": (compiled.logits - eager).abs().max().item(),
            "exported_max_difference": (exported.logits - eager).abs().max().item()}


def main() -> None:
    rows = [check(switches) for switches in ALL_SWITCHES]
    print("| switches | static = dynamic | compiled vs eager | exported vs eager |\n|---|---|---|---|")
    for row in rows:
        print(f"| {row['switches']} | {row['static_cache_equals_dynamic']} | {row['compiled_max_difference']:.1e} | "
              f"{row['exported_max_difference']:.1e} |")
    output = Path(__file__).parent / "results" / "compile_export_check.json"
    output.write_text(json.dumps({"torch": torch.__version__, "rows": rows}, indent=1))
    print(f"wrote {output}")


if __name__ == "__main__":
    main()
