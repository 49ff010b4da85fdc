# Sourced by the GPU scripts in bench/: on the GPU machine, whose image lacks deepspeed, omegaconf, webdataset,
# soundfile and pillow, installs the carried .whl/ into /tmp/site (once) and puts it and the repo on PYTHONPATH.
if [ -d .whl ] && ! python3 -c "import deepspeed, omegaconf, webdataset, soundfile, PIL" 2>/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
export PYTHONPATH=$PWD:${PYTHONPATH:-}
