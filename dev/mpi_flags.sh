#!/bin/sh
# dev/mpi_flags.sh compile|link MPICC: the MPI compile or link flags of the wrapper MPICC,
# in the form nvcc takes (the Makefile's CUDA targets use it).
#
# Open MPI's wrapper answers --showme:compile and --showme:link; MPICH's answers
# -compile_info and -link_info with a whole command line (the compiler first, and -c).
# nvcc takes -I, -D, -L and -l itself; every other flag goes to the host compiler
# (-Xcompiler: -pthread, -f..., -m...) or to the linker (-Wl,... becomes -Xlinker ...).
# Prints nothing and exits 1 when the wrapper answers neither query.
set -u
what=$1
mpicc=$2
if flags=$("$mpicc" --showme:"$what" 2>/dev/null); then
    :
elif flags=$("$mpicc" -"$what"_info 2>/dev/null); then
    flags=${flags#* } # MPICH: drop the compiler's name
else
    exit 1
fi
out=""
for f in $flags; do
    case $f in
        -I*|-D*|-L*|-l*|-isystem*) out="$out $f" ;;
        -c) ;; # MPICH's -compile_info includes the compile-only flag
        -Wl,*) out="$out -Xlinker ${f#-Wl,}" ;;
        *) out="$out -Xcompiler $f" ;;
    esac
done
echo "$out"
