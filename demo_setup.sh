# What the demos (run_demo.sh, run_seg_demo.sh, run_v2_demo.sh) share, sourced as `source demo_setup.sh NAME "$@"`:
# it enters the repository, sets OUTPUT (the -output DIR among the flags, the last one wins; else $OUTPUT; else a
# new folder ./output/NAME-<time>, so a run never overwrites one) and FLAGS (the other flags), installs
# requirements.txt (an installed Paddle 3.x, GPU build included, is kept: install_check.py says why) and sets NPROC
# (one process per GPU, 2 CPU processes over gloo without one).
cd "$(dirname "${BASH_SOURCE[0]}")"
OUTPUT=${OUTPUT:-./output/$1-$(date +%Y%m%d-%H%M%S)}
shift
args=("$@")
FLAGS=()  # the flags without -output DIR
for ((i = 0; i < ${#args[@]}; i++)); do
  if [[ ${args[i]} == -output ]] && ((i + 1 < ${#args[@]})); then
    OUTPUT=${args[i + 1]}
    i=$((i + 1))
  else
    FLAGS+=("${args[i]}")
  fi
done
requirements=$(mktemp)
trap 'rm -f "$requirements"' EXIT
python -m install_check requirements requirements.txt >"$requirements"
python -m pip install -q --disable-pip-version-check -r "$requirements"
NPROC=${NPROC:-$(python -m install_check demo-processes)}
