"""The ops' front doors, one module per op named as the op: argument checks, backend resolution,
and the torch implementation (importing a module registers it). The functions are re-exported by
:mod:`collider_kernels`."""
