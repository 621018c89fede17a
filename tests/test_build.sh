#!/usr/bin/env bash
# test_build.sh: the Makefile's MPI flags for nvcc, with fake MPI wrappers: an Open MPI
# wrapper that adds -pthread (source builds, HPC-X), an MPICH wrapper (no --showme), and
# one that answers neither (a build without MPI, said once). Needs nvcc; without it the
# CUDA targets are not built at all and there is nothing to test.
set -u
cd "$(dirname "$0")/.."
. tests/lib.sh test_build

if ! command -v nvcc >/dev/null && [ ! -x /usr/local/cuda/bin/nvcc ]; then
    echo "no nvcc: the CUDA targets are not built here, nothing to test"
    summary; exit
fi
nvcc=$(command -v nvcc || echo /usr/local/cuda/bin/nvcc)

# fake_mpicc NAME BODY: an executable wrapper in $TMP whose behaviour is the shell BODY
fake_mpicc() { printf '#!/bin/sh\n%s\n' "$2" > "$TMP/$1"; chmod +x "$TMP/$1"; echo "$TMP/$1"; }
# the nvcc command `make` would run for the FP32 trainer with MPICC=$1
nvcc_command() { make -s -n -B --no-print-directory train_gpt_cu_fp32 MPICC="$1" 2>&1; }

# Open MPI built from source: the real wrapper's flags plus -pthread on both sides
real_mpicc=$(command -v mpicc)
if [ -n "$real_mpicc" ]; then
    openmpi=$(fake_mpicc openmpi-pthread "case \$1 in --showme:*) echo \"-pthread \$($real_mpicc \$1)\";; *) exit 1;; esac")
    cmd=$(nvcc_command "$openmpi")
    if grep -q -- "-Xcompiler -pthread" <<<"$cmd" && ! sed 's/-Xcompiler -pthread//g' <<<"$cmd" | grep -q -- "-pthread" && grep -q -- "-DUSE_MPI" <<<"$cmd"; then
        ok "Open MPI wrapper with -pthread: nvcc gets -Xcompiler -pthread"
    else bad "Open MPI wrapper with -pthread: nvcc gets -Xcompiler -pthread" "$cmd"; fi
    # and nvcc really compiles and links an MPI program with those flags
    printf '#include <mpi.h>\nint main(int c, char** v) { MPI_Init(&c, &v); MPI_Finalize(); return 0; }\n' > "$TMP/hello.cu"
    if out=$("$nvcc" -DOMPI_SKIP_MPICXX $(sh dev/mpi_flags.sh compile "$openmpi") "$TMP/hello.cu" $(sh dev/mpi_flags.sh link "$openmpi") -o "$TMP/hello" 2>&1); then
        ok "nvcc compiles and links an MPI program with the translated flags"
    else bad "nvcc compiles and links an MPI program with the translated flags" "$out"; fi
else
    bad "Open MPI wrapper with -pthread" "no mpicc here (apt-get install libopenmpi-dev)"
fi

# MPICH: no --showme; -compile_info and -link_info print whole command lines
mpich=$(fake_mpicc mpich 'case $1 in
  -compile_info) echo "gcc -c -Wl,-z,relro -I/opt/mpich/include";;
  -link_info) echo "gcc -Wl,-z,relro -Wl,-rpath,/opt/mpich/lib -L/opt/mpich/lib -lmpi";;
  *) echo "gcc: error: unrecognized command-line option $1" >&2; exit 1;; esac')
cmd=$(nvcc_command "$mpich")
if grep -q -- "-I/opt/mpich/include" <<<"$cmd" && grep -q -- "-Xlinker -rpath,/opt/mpich/lib -L/opt/mpich/lib -lmpi" <<<"$cmd" \
   && grep -q -- "-DUSE_MPI" <<<"$cmd" && ! grep -qE -- "(^| )(-c|-Wl,)" <<<"$cmd"; then
    ok "MPICH wrapper: include path found, linker flags through -Xlinker"
else bad "MPICH wrapper: include path found, linker flags through -Xlinker" "$cmd"; fi

# a wrapper that tells nothing: no MPI in the CUDA build, and a note that says so
mute=$(fake_mpicc mute 'exit 1')
cmd=$(nvcc_command "$mute")
if ! grep -q -- "-DUSE_MPI" <<<"$cmd" && grep -q "the CUDA targets are built without MPI" <<<"$cmd"; then
    ok "a wrapper that answers neither query: built without MPI, with a note"
else bad "a wrapper that answers neither query: built without MPI, with a note" "$cmd"; fi

summary
