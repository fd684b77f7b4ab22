#!/usr/bin/env bash
# Shows that tests can fail: every tests/planted/NAME.patch plants one defect in a copy of the tree,
# and the tests its header names must then fail (and pass on the unplanted tree).
#
#   bash tests/planted/run.sh [NAME ...]        # all patches, or the named ones
#
# A patch starts with a line "# pytest: ARGS" (what to run, e.g. "tests/test_x.py -k keyword") and an
# optional "# needs: gpu"; patches that need a GPU are skipped without one. Prints one line per plant.
set -uo pipefail
cd "$(dirname "$0")/../.."
PY=${PY:-$(pwd)/.venv/bin/python}
[ -x "$PY" ] || PY=python
names=("$@")
[ ${#names[@]} -eq 0 ] && names=($(ls tests/planted/*.patch | xargs -n1 basename | sed 's/\.patch$//'))
has_gpu=$("$PY" -c "import torch; print(int(torch.cuda.is_available()))")
status=0
for name in "${names[@]}"; do
  patch=tests/planted/$name.patch
  args=$(sed -n 's/^# pytest: //p' "$patch" | head -1)
  if grep -q '^# needs: gpu' "$patch" && [ "$has_gpu" != 1 ]; then echo "SKIP   $name (needs a GPU)"; continue; fi
  work=$(mktemp -d)
  if git rev-parse --is-inside-work-tree >/dev/null 2>&1; then
    git ls-files -co --exclude-standard | grep -v '^tests/planted/' | tar -cf - -T - | tar -xf - -C "$work"
  else  # a copy of the tree without .git (the GPU machine)
    tar -cf - --exclude=./.git --exclude=./.venv --exclude=./.kit --exclude=./tests/planted . | tar -xf - -C "$work"
  fi
  if ! (cd "$work" && git apply --unidiff-zero "$OLDPWD/$patch" 2>/dev/null || patch -s -p1 < "$OLDPWD/$patch"); then
    echo "BROKEN $name (the patch no longer applies)"; status=1; rm -rf "$work"; continue
  fi
  out=$(cd "$work" && PYTHONPATH="$work${PYTHONPATH:+:$PYTHONPATH}" "$PY" -m pytest -q -p no:cacheprovider -x $args 2>&1)
  rc=$?
  if echo "$out" | tail -3 | grep -qE "[0-9]+ failed"; then
    echo "CAUGHT $name: $(echo "$out" | grep -E '^(FAILED|E )' | head -2 | tr '\n' ' ' | cut -c1-220)"
  elif [ $rc -ne 0 ] && [ $rc -ne 4 ] && [ $rc -ne 5 ]; then  # 4: usage error, 5: no test ran
    echo "CAUGHT $name (pytest died, exit $rc): $(echo "$out" | grep -E 'Error|error' | head -2 | tr '\n' ' ' | cut -c1-220)"
  else
    echo "MISSED $name: $(echo "$out" | tail -1)"; status=1
  fi
  rm -rf "$work"
done
exit $status
