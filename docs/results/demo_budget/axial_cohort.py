"""A phantom cohort whose lesion centres are spread evenly over the liver's slices (session 13 pilots of the demo).

The generator draws a lesion centre among the liver voxels deep enough to hold half the lesion, so lesions crowd the
liver's widest slices and the liver area alone ranks lesion slices (image AUROC 0.64-0.83 on the cohorts of sessions
8-12). This script swaps that draw in ``add_lesions``'s source for "a liver slice first, uniformly, then a voxel in it"
and writes the cohort with ``write_phantom_cohort`` (seed 0, 24 cases). Usage (repository root):

    python docs/results/demo_budget/axial_cohort.py OUT KINDS PERFUSION_HU D_MIN D_MAX
    e.g. python docs/results/demo_budget/axial_cohort.py /tmp/ph/raw_h hypo,hyper,rim 25 15 45
"""

import inspect
import sys

import pipeline.data.phantom as phantom
import pipeline.data.phantom_lesions as lesions

out, kinds, perfusion, d_min, d_max = sys.argv[1:6]
source = inspect.getsource(lesions.add_lesions)
draw = "center = np.array(np.unravel_index(candidates[rng.integers(candidates.size)], liver_label.shape))"
assert draw in source, "the generator's lesion centre draw changed"
by_slice = (
    "z = np.unravel_index(candidates, liver_label.shape)[2]; slices = np.unique(z); "
    "pool = candidates[z == slices[rng.integers(slices.size)]]; "
    "center = np.array(np.unravel_index(pool[rng.integers(pool.size)], liver_label.shape))"
)
exec(source.replace(draw, by_slice), lesions.__dict__)
phantom.add_lesions = lesions.add_lesions
phantom.write_phantom_cohort(out, n_cases=24, seed=0, lesion_kinds=kinds.split(","),
                             lesion_diameter_mm=(float(d_min), float(d_max)), perfusion_hu=float(perfusion))
