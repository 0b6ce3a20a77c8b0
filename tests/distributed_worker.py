"""One process of a multi-process run (tests/test_sharding.py starts two): for each --mesh, loads a checkpoint onto
that global mesh and computes logits for fixed ids; process 0 (only) writes them all to --out (.npz, one array per
mesh). Not a test module itself."""

from __future__ import annotations

import argparse

import numpy as np

from neox_jax.parallel import distributed


def main() -> None:
    p = distributed.add_arguments(argparse.ArgumentParser(description=__doc__), mesh=False)
    p.add_argument("ckpt")
    p.add_argument("--mesh", action="append", required=True, help="e.g. data=2,model=4; repeat for several")
    p.add_argument("--ids", required=True, help=".npy file with int ids [B, T]")
    p.add_argument("--out", required=True)
    args = p.parse_args()
    distributed.initialize_from_args(args)

    import jax

    import neox_jax
    from neox_jax.parallel import sharding

    ids, out = np.load(args.ids), {}
    for spec in args.mesh:
        model = neox_jax.load(args.ckpt, mesh=sharding.make_mesh(spec))
        out[spec] = model.logits(ids)
        print(
            f"process {jax.process_index()}/{jax.process_count()}: {jax.local_device_count()} local of "
            f"{jax.device_count()} devices, mesh {spec}, logits {out[spec].shape}",
            flush=True,
        )
    if distributed.is_main():
        np.savez(args.out, **out)
        distributed.main_print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
