"""The same stage-2 steps of the real tiny AF2 (two micro-batches accumulated, HTSAT training with BatchNorm
updates) give the same losses and parameters on 1 device and on 8 (data=2 x fsdp=2 x tensor=2, every mesh axis
split; fsdp=4 x data=2 is the two-process test's mesh): sharding changes where the work runs, not what it
computes."""
import numpy as np

from helpers import run_steps


def test_one_device_and_eight_devices_agree():
    reference = run_steps(2, (1, 1, 1))
    run = run_steps(2, (2, 2, 2))
    np.testing.assert_allclose(run["losses"], reference["losses"], rtol=0, atol=1e-5)
    assert reference["losses"][1] != reference["losses"][0]  # the second step saw updated parameters
    for key in ("params_after", "stats_after"):
        assert run[key].keys() == reference[key].keys()
        for path in reference[key]:
            np.testing.assert_allclose(run[key][path], reference[key][path], rtol=1e-4, atol=1e-5, err_msg=path)


def test_one_row_per_batch_shard_with_tensor_parallelism():
    """data=2 x fsdp=2 x tensor=2 with 4 rows per micro-batch: each batch shard holds one row, and each row is
    split over the tensor pair (the layout where Shardy once gave a ~1 % different loss on a stand-in model)."""
    reference = run_steps(1, (1, 1, 1), rows=4)
    run = run_steps(1, (2, 2, 2), rows=4)
    np.testing.assert_allclose(run["losses"], reference["losses"], rtol=0, atol=1e-5)
    for path in reference["params_after"]:
        np.testing.assert_allclose(run["params_after"][path], reference["params_after"][path], rtol=1e-4,
                                   atol=1e-5, err_msg=path)
