"""Prune with the pipeline of another commit's tree, for identity checks between commits.

    python compare_with_commit.py TREE MODEL OUT CONFIG_JSON   # MODEL: tiny | default | a path
    python compare_outputs.py OUT_OF_ONE OUT_OF_OTHER            # -> results/streaming/identity_*.txt

TREE is a checkout of any commit (git worktree add); the PruneConfig fields come as JSON. Writes the
perplexities, per-layer objectives and swaps (r.json) and the masks (masks.pt) to OUT."""
import sys, json, pathlib, tempfile, torch
sys.path.insert(0, sys.argv[1]); sys.path.insert(0, sys.argv[1] + "/tests")
from sparseswaps.pipeline import PruneConfig, prune_model
from safetensors.torch import load_file
model = sys.argv[2]; out = pathlib.Path(sys.argv[3]); kw = json.loads(sys.argv[4])
if model == "tiny":
    from tiny_models import save_tiny
    model = str(save_tiny(pathlib.Path(tempfile.mkdtemp()) / "llama", kw.pop("family", "llama")))
elif model == "default":
    model = None
r = prune_model(PruneConfig(model=model, **kw), save=out / "model", checkpointing=False)
json.dump({"ppl": r["perplexity"], "layers": [(x["layer"], x["objective"], x["swaps"]) for x in r["layers"]],
           "seconds": r["summary"]["pruning_seconds"]}, open(out / "r.json", "w"))
from safetensors import safe_open
with safe_open(str(out / "model" / "masks.safetensors"), "pt") as h:
    packed = (h.metadata() or {}).get("widths")
if packed:
    from sparseswaps.checkpoint import load_masks
    masks = load_masks(out / "model" / "masks.safetensors")
else:
    masks = load_file(str(out / "model" / "masks.safetensors"))
torch.save(masks, out / "masks.pt")
