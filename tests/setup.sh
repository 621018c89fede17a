#!/usr/bin/env bash
# tests/setup.sh: what `make test` needs besides a C compiler, installed where it is missing,
# so that `make test` works on a fresh Debian machine with nothing run before it:
#   Debian: python3-torch and python3-numpy (dev/reference.py), python3-pip, Open MPI
#           (openmpi-bin, libopenmpi-dev: the multi-rank tests);
#   pip, into the Python with Debian's PyTorch ($PYTHON_TORCH, /usr/bin/python3): transformers
#           4.44.2 (the reference values are its math; 5.x needs a newer torch) and safetensors;
#   pip, into the Python on PATH ($PYTHON, python3): tiktoken and tokenizers (data
#           preparation), matplotlib (dev/plot.py).
# As root it installs them (apt-get, pip); otherwise it stops with the one command that would.
# Quiet when everything is there. Exit status 0 when everything is there at the end.
set -u
PYTHON_TORCH=${PYTHON_TORCH:-/usr/bin/python3}
PYTHON=${PYTHON:-python3}

# missing: sets apt, pip_torch and pip to what is not installed yet
missing() {
    apt=() pip_torch=() pip=()
    command -v mpirun > /dev/null && command -v mpicc > /dev/null || apt+=(openmpi-bin libopenmpi-dev)
    [ -x /usr/bin/time ] || apt+=(time)     # tests/test_hf_job.sh measures peak memory with it
    command -v g++ > /dev/null || apt+=(g++) # the CUDA emulator builds with it
    "$PYTHON_TORCH" -c "import torch, numpy" 2> /dev/null || apt+=(python3-torch python3-numpy)
    "$PYTHON_TORCH" -m pip --version > /dev/null 2>&1 || apt+=(python3-pip)
    "$PYTHON_TORCH" -c "import transformers, safetensors" 2> /dev/null || pip_torch+=(transformers==4.44.2 safetensors)
    local m
    for m in tiktoken tokenizers matplotlib; do "$PYTHON" -c "import $m" 2> /dev/null || pip+=("$m"); done
}

# pip into a Python that PEP 668 marks externally managed (Debian's) needs consent; given
# through the environment it holds before that Python is installed, and other Pythons ignore it
export PIP_BREAK_SYSTEM_PACKAGES=1

# pip_pins PYTHON: numpy at the version that Python has: a package that wants a newer numpy
# (matplotlib does) must not upgrade it under Debian's PyTorch, which is built against it
pip_pins() {
    "$1" -c "import numpy; print('numpy==' + numpy.__version__)" 2> /dev/null
}

# the command that installs what is missing, as one line
install_command() {
    local sudo=$1 cmd=()
    [ ${#apt[@]} -eq 0 ] || cmd+=("${sudo}apt-get install -y ${apt[*]}")
    # the numpy pin is worked out when the command runs, after apt-get has installed numpy
    local pin="\"numpy==\$($PYTHON_TORCH -c 'import numpy; print(numpy.__version__)')\""
    [ ${#pip_torch[@]} -eq 0 ] || cmd+=("${sudo}env PIP_BREAK_SYSTEM_PACKAGES=1 $PYTHON_TORCH -m pip install ${pip_torch[*]} $pin")
    [ ${#pip[@]} -eq 0 ] || cmd+=("env PIP_BREAK_SYSTEM_PACKAGES=1 $PYTHON -m pip install ${pip[*]} $(pip_pins "$PYTHON")")
    local IFS='&'
    echo "${cmd[*]}" | sed 's/&/ \&\& /g'
}

missing
[ ${#apt[@]} -eq 0 ] && [ ${#pip_torch[@]} -eq 0 ] && [ ${#pip[@]} -eq 0 ] && exit 0
echo "make test needs:$(printf " %s" "${apt[@]}" "${pip_torch[@]}" "${pip[@]}")"
if [ "$(id -u)" -ne 0 ]; then
    echo "not root, so not installing them; this command would (then run make test again):" >&2
    echo "    $(install_command "sudo ")" >&2
    exit 1
fi
export DEBIAN_FRONTEND=noninteractive
if [ ${#apt[@]} -gt 0 ]; then
    echo "installing with apt-get: ${apt[*]}"
    apt-get update -qq > /dev/null && apt-get install -y -qq "${apt[@]}" > /dev/null
fi
missing # pip may have come with apt
if [ ${#pip_torch[@]} -gt 0 ]; then
    echo "installing with pip into $PYTHON_TORCH: ${pip_torch[*]}"
    "$PYTHON_TORCH" -m pip install --quiet "${pip_torch[@]}" $(pip_pins "$PYTHON_TORCH")
fi
if [ ${#pip[@]} -gt 0 ]; then
    echo "installing with pip into $PYTHON: ${pip[*]}"
    "$PYTHON" -m pip install --quiet "${pip[@]}" $(pip_pins "$PYTHON")
fi
missing
if [ ${#apt[@]} -gt 0 ] || [ ${#pip_torch[@]} -gt 0 ] || [ ${#pip[@]} -gt 0 ]; then
    echo "tests/setup.sh: still missing after installing:$(printf " %s" "${apt[@]}" "${pip_torch[@]}" "${pip[@]}"); install them with:" >&2
    echo "    $(install_command "")" >&2
    exit 1
fi
echo "test dependencies installed"
