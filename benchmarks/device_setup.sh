# Installs the peers (FlashAttention-4 and its CuTe-DSL libraries, SageAttention) and diffusers on
# the lent GPU machine, whose image has none of them and no network. Source it, don't run it:
#
#   call 1:  bash benchmarks/device_setup.sh stage       (carry: .whl/cu13)
#   call 2:  source benchmarks/device_setup.sh && ...   (carry: .whl/small; within the machine's idle
#                                                         release, so call 1's files are still there)
#
# .whl/cu13 holds cu13.tar.xz: the contents of nvidia-cutlass-dsl-libs-cu13 4.8.1 (a 92 MB wheel,
# over the 64 MiB a call may carry; xz brings it to 61 MiB), built reproducibly (the same bytes each time):
#   unzip the wheel into an empty folder, then in it
#   tar cf - --sort=name --mtime=2026-01-01 --owner=0 --group=0 --numeric-owner . | xz -9 -T2 > cu13.tar.xz .whl/small holds the other wheels
# (`pip download --no-deps` of flash-attn-4 4.0.0b36, nvidia-cutlass-dsl{,-libs-base} 4.8.1,
# apache-tvm-ffi 0.1.15.post2, torch-c-dlpack-ext 0.1.5, quack-kernels 0.6.5, einops, sageattention
# 1.0.6, diffusers 0.42.1). Everything goes to one `pip install --target` folder, outside the work
# tree, which stays while the machine is warm. The CuTe DSL's `dsl_packages` folder is found through
# a .pth file in a normal install; --target does not read .pth files, so it goes on PYTHONPATH here.

PEERS=/tmp/autosparse-peers
CU13_SHA256=7543942e42fc66d09c62fd8f2ad7a05fe79004025f7953ca192e6eee5d08d7b6

if [ "${1:-}" = "stage" ]; then
    set -e
    echo "$CU13_SHA256  .whl/cu13/cu13.tar.xz" | sha256sum -c --quiet
    mkdir -p "$PEERS/cu13"
    tar xJf .whl/cu13/cu13.tar.xz -C "$PEERS/cu13"
    touch "$PEERS/.cu13"
    echo "staged the CuTe-DSL CUDA-13 libraries in $PEERS"
else
    if [ ! -e "$PEERS/.cu13" ]; then
        echo "device_setup: the CUDA-13 libraries are not staged on this machine (run the 'stage' call first;" \
             "the machine was released in between?): FA4 will not import" >&2
    fi
    if [ ! -e "$PEERS/.small" ] && [ -d .whl/small ]; then
        # pip --target skips a package folder that already exists: the libraries are merged in after
        python3 -m pip install -q --no-deps --no-index --target "$PEERS/site" .whl/small/*.whl \
            && { [ ! -e "$PEERS/.cu13" ] || cp -rn "$PEERS/cu13/." "$PEERS/site/"; } && touch "$PEERS/.small"
    fi
    export PYTHONPATH="$PEERS/site:$PEERS/site/nvidia_cutlass_dsl/dsl_packages${PYTHONPATH:+:$PYTHONPATH}"
    python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null
fi
