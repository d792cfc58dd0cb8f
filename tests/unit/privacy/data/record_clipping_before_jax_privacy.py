"""Recorded clipping_before_jax_privacy.npz: the outputs of the hand-written per-example
clipping that ffa_jax had before it moved onto jax-privacy (ffa_jax/privacy/clipping.py at
main commit c80678d), on the fixed inputs of tests/unit/privacy/jax_privacy_cases.py.

    git show c80678d:ffa_jax/privacy/clipping.py > /tmp/old_clipping.py
    PYTHONPATH=$PWD python tests/unit/privacy/data/record_clipping_before_jax_privacy.py \\
        /tmp/old_clipping.py tests/unit/privacy/data/clipping_before_jax_privacy.npz
"""

import importlib.util
import sys

import numpy as np

from tests.unit.privacy import jax_privacy_cases as cases


def main(old_module_path: str, out_path: str) -> None:
    spec = importlib.util.spec_from_file_location("old_clipping", old_module_path)
    old = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(old)
    out = {}
    for name in cases.case_names():
        for k, v in cases.run_case(old.clipped_grad, name).items():
            out[f"{name}|{k}"] = v
    np.savez_compressed(out_path, **out)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
