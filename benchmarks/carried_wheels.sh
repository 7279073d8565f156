# Sourced by the GPU scripts: install the wheels carried in .whl/ (liger-kernel for the benchmark
# baseline, pytest-xdist for parallel GPU tests; fetched with `pip download -d .whl ...` on a
# machine with a registry) into /tmp/site and put it on PYTHONPATH. Nothing carried: nothing done.
if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
