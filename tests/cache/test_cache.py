"""Names the cache layout defines once."""


def test_feature_names_are_built_and_read_back_in_one_place():
    """``pool{n}`` is written by feature_name and read by pool_of everywhere (extract, heads,
    predict, export, report): a round trip, and nothing else is taken for a pool size."""
    from featx.features import PENULTIMATE, feature_name, pool_of
    assert [feature_name(n) for n in (1, 2, 8)] == ["pool1", "pool2", "pool8"]
    assert all(pool_of(feature_name(n)) == n for n in (1, 2, 4, 8, 16))
    for other in (PENULTIMATE, "pool", "poolx", "pool-2", "pool\u00b2", "xpool2", None):
        assert pool_of(other) is None, other
