"""k-means filter clustering on the pretrained ResNet20: the reference model,
the clustering and merging invariants, the sweeps on a real server, bad input."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from prunelab import checkpoints, cli, config, data, models, studies
from prunelab.errors import ConfigError, ModelError
from prunelab.pruning import clustering, merging
from prunelab.train import evaluate

REFERENCE_ACCURACY = 0.9173  # the published figure, also measured on the 846 shared test images


@pytest.fixture(scope="module")
def cifar(cifar_dir):
    return data.get(config.DataConfig(dataset="cifar10", data_dir=str(cifar_dir)))


@pytest.fixture(scope="module")
def resnet20(resnet20_file):
    return checkpoints.load(resnet20_file, "resnet20")


def test_reference_widths_and_param_counts():
    """The definitions match the reference: 0.27M / 0.46M / 0.66M / 0.85M / 1.7M parameters."""
    expected = {"resnet20": 0.27e6, "resnet32": 0.46e6, "resnet44": 0.66e6, "resnet56": 0.85e6, "resnet110": 1.7e6}
    for name, count in expected.items():
        assert abs(models.count_params(models.get(name)) - count) / count < 0.02, name
    assert models.count_params(models.get("resnet20")) == 269_722


def test_evaluate_cli_scores_reference_checkpoint(resnet20_file, cifar_dir, capsys):
    """`prunelab evaluate FILE --model resnet20` prints JSON; the shared checkpoint scores 91.73 % +- 1 pp."""
    rc = cli.main(["evaluate", str(resnet20_file), "--model", "resnet20", "--dataset", "cifar10", "--data-dir", str(cifar_dir)])
    assert rc == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["n"] == 846
    assert abs(result["accuracy"] - REFERENCE_ACCURACY) <= 0.01


def test_checkpoint_of_another_depth_names_its_depth(tmp_path, capsys):
    """A resnet32 file loaded as resnet20 fails in one line naming resnet32, in the library and the CLI."""
    state = {f"module.{k}": v for k, v in models.get("resnet32").state_dict().items()}
    path = tmp_path / "resnet32.th"
    torch.save({"best_prec1": 92.6, "state_dict": state}, path)
    with pytest.raises(ModelError, match="resnet32"):
        checkpoints.load(path, "resnet20")
    assert checkpoints.load(path, "resnet32").spec()["mid_widths"] == [16] * 5 + [32] * 5 + [64] * 5
    rc = cli.main(["evaluate", str(path), "--model", "resnet20", "--dataset", "cifar10"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and "pass --model resnet32" in err


def test_k_equal_c_leaves_network_unchanged(resnet20, cifar):
    """K = C (0 clusters pruned) in every conv changes no weight, no output and no accuracy."""
    x = cifar.normalise(cifar.test_x[:200])
    clustered = copy.deepcopy(resnet20)
    ks = clustering.cluster_layers(clustered, list(resnet20.conv_layers()), 0, seed=0)
    assert ks == {n: c.out_channels for n, c in resnet20.conv_layers().items()}
    with torch.no_grad():
        assert torch.equal(clustered(x), resnet20(x))
    before = evaluate(resnet20, cifar.test_x[:400], cifar.test_y[:400], cifar.normalise)
    after = evaluate(clustered, cifar.test_x[:400], cifar.test_y[:400], cifar.normalise)
    assert after["accuracy"] == before["accuracy"]


@pytest.mark.parametrize("distance,importance", [("euclidean", "none"), ("cosine", "l1")])
def test_clustering_leaves_exactly_k_distinct_filters(resnet20, distance, importance):
    """After clustering a conv to K, it holds exactly K distinct filters, each its members' centroid."""
    conv = copy.deepcopy(resnet20.layer2[1].conv1)
    original = conv.weight.detach().clone().reshape(32, -1)
    clusters = clustering.replace_by_centroids(conv, 20, seed=3, distance=distance, importance=importance)
    rows = conv.weight.detach().reshape(32, -1)
    assert torch.unique(rows, dim=0).shape[0] == 20
    for j in range(20):
        members = original[clusters.labels == j]
        if importance == "none":
            assert torch.allclose(rows[clusters.labels == j][0], members.mean(0), atol=1e-6)
    # a fixed seed gives the same clusters
    again = clustering.kmeans(original, 20, seed=3, distance=distance, importance=importance)
    assert torch.equal(again.labels, clusters.labels)


@pytest.mark.parametrize("k", [0, -1, 17, 2.5])
def test_bad_number_of_clusters(resnet20, k):
    """K <= 0 or K > C (or not an integer) is refused naming the valid range."""
    with pytest.raises(ConfigError, match=r"K must be in 1\.\.16"):
        clustering.replace_by_centroids(copy.deepcopy(resnet20.layer1[0].conv1), k, seed=0)


def test_unknown_layer_and_stage_list_valid_ones(resnet20):
    """A layer or stage name that does not exist fails listing the valid ones."""
    with pytest.raises(ConfigError) as info:
        clustering.resolve_layers(resnet20, ["layer4.0.conv1"])
    assert "layer4.0.conv1" in str(info.value) and "layer1.0.conv1" in str(info.value) and "layer3.2.conv2" in str(info.value)
    with pytest.raises(ConfigError, match="layer1, layer2, layer3"):
        clustering.resolve_stage(resnet20, "layer4")


def test_merged_network_matches_centroid_network(resnet20, cifar, tmp_path):
    """Merging is exact: merged outputs equal the unmerged centroid network's; with K = C
    they equal the original's; the merged network is smaller and reloads from a weights-only file."""
    x = cifar.normalise(cifar.test_x[:128])
    with torch.no_grad():
        original = resnet20(x)
    for keep, distance in ((1.0, "euclidean"), (0.75, "cosine"), (0.5, "euclidean")):
        plan = merging.plan_merge(resnet20, keep, seed=0, distance=distance, n_init=2)
        centroid_net, merged = copy.deepcopy(resnet20), copy.deepcopy(resnet20)
        merging.apply_merge(centroid_net, plan, centroids_only=True)
        widths = merging.apply_merge(merged, plan)
        with torch.no_grad():
            out_merged, out_centroid = merged(x), centroid_net(x)
        scale = out_centroid.abs().max().item()
        assert (out_merged - out_centroid).abs().max().item() <= 1e-5 * max(scale, 1.0), keep
        expected = [round(keep * w) for w in (16, 32, 64) for _ in range(3)]
        assert merged.spec()["mid_widths"] == expected == list(widths.values())
        if keep == 1.0:
            assert torch.allclose(out_merged, original, atol=1e-4)
            assert models.count_params(merged) == models.count_params(resnet20)
        else:
            assert models.count_params(merged) < models.count_params(resnet20)
        reloaded = checkpoints.load(checkpoints.save(merged, tmp_path / f"merged-{keep}.pt"))
        with torch.no_grad():
            assert torch.equal(reloaded(x), out_merged)
    with pytest.raises(ConfigError, match=r"\(0, 1\]"):
        merging.plan_merge(resnet20, 0.0, seed=0)


def test_bad_kmeans_settings():
    """Unknown distance or importance, and kept fractions outside (0, 1], fail at load time."""
    for override, text in (("kmeans.distance=manhattan", "euclidean"), ("kmeans.importance=taylor", "l1"),
                           ("kmeans.merge_keep=[0.5,1.5]", "(0, 1]"), ("kmeans.stage_pruned=[-1]", ">= 0")):
        with pytest.raises(ConfigError, match=text.replace("(", r"\(").replace("]", r"\]")):
            studies.load_config("kmeans-resnet20-cifar10", [override])
