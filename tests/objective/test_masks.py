"""build_memory_mask against hand-worked matrices for 3 segments of 3 tokens."""
import pytest
import torch

from trime_dist.objective.masks import TokenMeta, build_memory_mask

# Tokens 0..8: segment (row) s = i // 3, position i % 3. Segments 0 and 1 are consecutive pieces of
# stream 0 (stream indices 0, 1); segment 2 is the first piece of stream 1.
META = TokenMeta(row=torch.tensor([0, 0, 0, 1, 1, 1, 2, 2, 2]),
                 position=torch.tensor([0, 1, 2, 0, 1, 2, 0, 1, 2]),
                 stream=torch.tensor([0, 0, 0, 0, 0, 0, 1, 1, 1]),
                 stream_index=torch.tensor([0, 0, 0, 1, 1, 1, 0, 0, 0]))

EXPECTED = {
    ("none", True): ["000 000 000"] * 9,
    ("local", True): ["000 000 000",
                      "100 000 000",
                      "110 000 000",
                      "000 000 000",
                      "000 100 000",
                      "000 110 000",
                      "000 000 000",
                      "000 000 100",
                      "000 000 110"],
    ("long", True): ["000 000 000",
                     "100 000 000",
                     "110 000 000",
                     "111 000 000",
                     "111 100 000",
                     "111 110 000",
                     "000 000 000",
                     "000 000 100",
                     "000 000 110"],
    ("external", True): ["000 111 111",
                    "100 111 111",
                    "110 111 111",
                    "111 000 111",
                    "111 100 111",
                    "111 110 111",
                    "111 111 000",
                    "111 111 100",
                    "111 111 110"],
    ("external", False): ["000 111 111",
                     "000 111 111",
                     "000 111 111",
                     "111 000 111",
                     "111 000 111",
                     "111 000 111",
                     "111 111 000",
                     "111 111 000",
                     "111 111 000"],
}


def as_tensor(rows):
    return torch.tensor([[c == "1" for c in r.replace(" ", "")] for r in rows])


@pytest.mark.parametrize("layout,use_local", list(EXPECTED))
def test_mask_matches_hand_worked(layout, use_local):
    got = build_memory_mask(META, META, layout, use_local)
    assert got.dtype == torch.bool
    assert torch.equal(got, as_tensor(EXPECTED[(layout, use_local)]))


@pytest.mark.parametrize("layout,use_local", list(EXPECTED))
def test_mask_follows_token_order_and_key_subsets(layout, use_local):
    """Masks come from metadata, not positions in the tensor: permuting and slicing commutes."""
    perm_q, perm_k = torch.randperm(9), torch.randperm(9)[:5]
    got = build_memory_mask(META.select(perm_q), META.select(perm_k), layout, use_local)
    expected = as_tensor(EXPECTED[(layout, use_local)])[perm_q][:, perm_k]
    assert torch.equal(got, expected)


def test_local_use_local_flag_only_matters_for_external():
    assert torch.equal(build_memory_mask(META, META, "local", use_local=False), as_tensor(EXPECTED[("local", True)]))


def test_unknown_layout_and_bad_meta_raise():
    with pytest.raises(ValueError, match="layout"):
        build_memory_mask(META, META, "global")
    with pytest.raises(ValueError, match="TokenMeta"):
        TokenMeta(torch.zeros(3), torch.zeros(3), torch.zeros(2), torch.zeros(3))


def test_external_without_the_query_streams_future():
    """exclude_future: segment 0's queries lose segment 1 (the next piece of their own stream); segment 1 keeps
    segment 0 (its past: long memory) and both keep stream 1's segment."""
    got = build_memory_mask(META, META, "external", True, exclude_future=True)
    expected = as_tensor(["000 000 111",
                          "100 000 111",
                          "110 000 111",
                          "111 000 111",
                          "111 100 111",
                          "111 110 111",
                          "111 111 000",
                          "111 111 100",
                          "111 111 110"])
    assert torch.equal(got, expected)
