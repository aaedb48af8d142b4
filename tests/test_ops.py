"""Pure tensor functions (ops, scoring, masks) against hand computations on small literal tensors."""

from __future__ import annotations

import math
from fractions import Fraction

import pytest
import torch

from tokencompress.engine.masks import allowed_keys, to_implementation
from tokencompress.engine.scoring import attention_received, query_rows
from tokencompress.ops import compact_columns, gather_rows, keep_counts, top_k_mask

T, F = True, False


def bools(rows):
    return torch.tensor(rows, dtype=torch.bool)


# -- keep_counts ---------------------------------------------------------------------------------------------


def test_keep_counts_ratio_is_ceil():
    n = torch.tensor([10, 7, 0, 576, 1, 3])
    # ceil(10 x .5)=5, ceil(3.5)=4, 0, ceil(288)=288, ceil(.5)=1, ceil(1.5)=2
    assert keep_counts(n, 0.5).tolist() == [5, 4, 0, 288, 1, 2]
    # ceil(2.5)=3, ceil(1.75)=2, 0, ceil(144)=144, ceil(.25)=1, ceil(.75)=1
    assert keep_counts(n, 0.25).tolist() == [3, 2, 0, 144, 1, 1]
    assert keep_counts(n, 1.0).tolist() == [10, 7, 0, 576, 1, 3]


@pytest.mark.parametrize(
    ("n", "keep", "expected"),
    [
        (10, 0.3, 3),  # the classic example
        (25, 0.28, 7),  # 25 * 0.28 == 7.000000000000001 in binary floating point
        (25, 0.56, 14),  # 14.000000000000002
        (100, 0.07, 7),  # 7.000000000000001
        (3, 0.1, 1),  # 0.30000000000000004: ceil is 1 either way
        (576, 0.3, 173),  # 172.8
        (576, 1 / 3, 192),  # LLaVA-1.5 at one third
    ],
)
def test_keep_counts_float_edges(n, keep, expected):
    assert keep_counts(torch.tensor([n]), keep).tolist() == [expected]


def test_keep_counts_matches_exact_decimal_ceil():
    """ceil(N x p/100) computed exactly with fractions, for every percentage and N up to 600."""
    n = torch.arange(0, 601)
    for p in range(1, 101):
        expected = [math.ceil(Fraction(p, 100) * int(v)) for v in n]
        assert keep_counts(n, p / 100).tolist() == expected, p


def test_keep_counts_tiny_positive_ratio_keeps_one_token():
    # ceil(5 x 1e-10) = 1: a positive ratio never keeps zero tokens of a non-empty image
    assert keep_counts(torch.tensor([5, 576, 0]), 1e-10).tolist() == [1, 1, 0]


def test_keep_counts_absolute_count_is_capped_by_n():
    n = torch.tensor([10, 3, 0, 5])
    assert keep_counts(n, 5).tolist() == [5, 3, 0, 5]
    assert keep_counts(n, 1).tolist() == [1, 1, 0, 1]


# -- top_k_mask ----------------------------------------------------------------------------------------------


def test_top_k_mask_basic_and_ties_to_earlier_column():
    scores = torch.tensor([[0.1, 0.5, 0.5, 0.3, 0.9]])
    everything = bools([[T, T, T, T, T]])
    assert top_k_mask(scores, everything, torch.tensor([1])).tolist() == [[F, F, F, F, T]]
    # 0.9 then the tie 0.5/0.5: the earlier column (1) wins
    assert top_k_mask(scores, everything, torch.tensor([2])).tolist() == [[F, T, F, F, T]]
    assert top_k_mask(scores, everything, torch.tensor([3])).tolist() == [[F, T, T, F, T]]
    flat = torch.tensor([[0.2, 0.2, 0.2, 0.2]])
    assert top_k_mask(flat, bools([[T, T, T, T]]), torch.tensor([2])).tolist() == [[T, T, F, F]]
    # with column 0 not a candidate, the tie goes to the earliest candidate
    assert top_k_mask(flat, bools([[F, T, T, T]]), torch.tensor([2])).tolist() == [[F, T, T, F]]


def test_top_k_mask_candidates_and_per_row_counts():
    scores = torch.tensor(
        [
            [9.0, 1.0, 2.0, 3.0, 4.0],  # column 0 scores highest but is not a candidate
            [0.5, 0.4, 0.3, 0.2, 0.1],
            [0.1, 0.2, 0.3, 0.4, 0.5],
            [1.0, 2.0, 3.0, 4.0, 5.0],
        ]
    )
    candidates = bools(
        [
            [F, T, T, T, T],
            [T, T, T, T, T],
            [T, F, T, F, T],
            [T, T, T, T, T],
        ]
    )
    counts = torch.tensor([2, 3, 5, 0])  # row 2 asks for more than its 3 candidates; row 3 for none
    expected = [
        [F, F, F, T, T],
        [T, T, T, F, F],
        [T, F, T, F, T],
        [F, F, F, F, F],
    ]
    assert top_k_mask(scores, candidates, counts).tolist() == expected


def test_top_k_mask_negative_scores_and_non_candidate_with_equal_score():
    # A candidate must beat any non-candidate, whatever its score
    scores = torch.tensor([[-5.0, -1.0, -3.0]])
    assert top_k_mask(scores, bools([[T, F, T]]), torch.tensor([2])).tolist() == [[T, F, T]]
    assert top_k_mask(scores, bools([[T, F, T]]), torch.tensor([1])).tolist() == [[F, F, T]]


# -- compact_columns and gather_rows -------------------------------------------------------------------------


def test_compact_columns():
    keep = bools(
        [
            [T, F, T, F, T],
            [F, F, F, T, F],
            [F, F, F, F, F],
            [T, T, T, T, T],
        ]
    )
    columns, real = compact_columns(keep)
    assert columns.shape == real.shape == (4, 5)  # width = the longest row (5)
    assert real.tolist() == [
        [T, T, T, F, F],
        [T, F, F, F, F],
        [F, F, F, F, F],
        [T, T, T, T, T],
    ]
    assert columns[0, :3].tolist() == [0, 2, 4]
    assert columns[1, :1].tolist() == [3]
    assert columns[3].tolist() == [0, 1, 2, 3, 4]
    # the filler columns point at unkept entries (documented), never at a kept one
    for row in range(4):
        for col in range(5):
            if not real[row, col]:
                assert not keep[row, columns[row, col]]


def test_compact_columns_width_is_longest_row():
    columns, real = compact_columns(bools([[F, T, F, F], [F, F, T, T]]))
    assert columns.shape == (2, 2)
    assert columns[0, 0].item() == 1
    assert columns[1].tolist() == [2, 3]
    assert real.tolist() == [[T, F], [T, T]]


def test_gather_rows():
    x = torch.tensor(
        [
            [[0.0, 1.0], [10.0, 11.0], [20.0, 21.0]],
            [[100.0, 101.0], [110.0, 111.0], [120.0, 121.0]],
        ]
    )
    columns = torch.tensor([[2, 0], [1, 1]])
    expected = torch.tensor(
        [
            [[20.0, 21.0], [0.0, 1.0]],
            [[110.0, 111.0], [110.0, 111.0]],
        ]
    )
    assert torch.equal(gather_rows(x, columns), expected)
    # 2-D input (B, n)
    assert gather_rows(torch.tensor([[5, 6, 7], [8, 9, 10]]), columns).tolist() == [[7, 5], [9, 9]]


def test_gather_rows_broadcasts_batch_one():
    x = torch.tensor([[[0.0], [1.0], [2.0], [3.0]]])  # (1, 4, 1), e.g. rotary cos shared by the batch
    columns = torch.tensor([[3, 1], [0, 2], [2, 2]])
    assert gather_rows(x, columns).squeeze(-1).tolist() == [[3.0, 1.0], [0.0, 2.0], [2.0, 2.0]]


# -- query_rows ----------------------------------------------------------------------------------------------


def _real_columns(columns, weights):
    """Per row: the (column, weight) pairs with nonzero weight."""
    return [
        [(int(c), round(float(w), 6)) for c, w in zip(cs, ws, strict=True) if w > 0]
        for cs, ws in zip(columns, weights, strict=True)
    ]


def test_query_rows_last_left_and_right_padding():
    key_ok = bools(
        [
            [F, F, T, T, T],  # left padded: last real token at 4
            [T, T, T, F, F],  # right padded: last real token at 2
            [T, T, T, T, T],
        ]
    )
    is_visual = bools([[F, F, F, T, F], [F, T, F, F, F], [T, T, F, F, F]])
    order = torch.arange(5).expand(3, 5)
    columns, weights = query_rows("last", key_ok, is_visual, order)
    assert columns.tolist() == [[4], [2], [4]]
    assert weights.tolist() == [[1.0], [1.0], [1.0]]


def test_query_rows_last_follows_logical_order():
    # a shortened sequence: slots hold input positions 0, 2, 5, 7 (+ a filler slot that is not ok)
    key_ok = bools([[T, T, T, T, F]])
    order = torch.tensor([[0, 2, 5, 7, 1]])
    columns, _ = query_rows("last", key_ok, bools([[F, T, F, F, F]]), order)
    assert columns.tolist() == [[3]]


def test_query_rows_text_left_and_right_padding():
    #            0  1  2  3  4  5  6
    key_ok = bools(
        [
            [F, F, T, T, T, T, T],  # left padded: text, vis, vis, text, text
            [T, T, T, T, T, F, F],  # right padded: text, vis, text, vis, text
            [T, T, T, T, T, T, T],  # no image at all: every token is "after the image"
            [F, F, F, T, T, T, T],  # left padded, image last: falls back to the last token
        ]
    )
    is_visual = bools(
        [
            [F, F, F, T, T, F, F],
            [F, T, F, T, F, F, F],
            [F, F, F, F, F, F, F],
            [F, F, F, F, T, T, T],
        ]
    )
    order = torch.arange(7).expand(4, 7)
    columns, weights = query_rows("text", key_ok, is_visual, order)
    assert torch.allclose(weights.sum(1), torch.ones(4))
    assert _real_columns(columns, weights) == [
        [(5, 0.5), (6, 0.5)],
        [(4, 1.0)],  # only the text after the *last* image
        [(c, round(1 / 7, 6)) for c in range(7)],
        [(6, 1.0)],
    ]


# -- attention_received --------------------------------------------------------------------------------------


def test_attention_received_two_heads_gqa_by_hand():
    """2 query heads share 1 key head; scores by hand: logits = q.k x scaling, softmax, mean over heads."""
    queries = torch.tensor([[[[1.0, 0.0]], [[0.0, 1.0]]]])  # (B=1, H=2, q=1, d=2)
    keys = torch.tensor([[[[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]]])  # (B=1, Hkv=1, k=3, d=2)
    allowed = torch.ones(1, 1, 3, dtype=torch.bool)
    weights = torch.ones(1, 1)
    got = attention_received(queries, keys, allowed, weights, scaling=1.0)
    e = math.e
    # head 0 logits [1, 0, 1] -> [e, 1, e] / (2e + 1); head 1 logits [0, 1, 1] -> [1, e, e] / (2e + 1)
    z = 2 * e + 1
    expected = torch.tensor([[(e + 1) / (2 * z), (e + 1) / (2 * z), e / z]])
    assert got.dtype == torch.float32
    assert torch.allclose(got, expected, atol=1e-7)

    # scaling multiplies the logits: with scaling 2, head 0 -> [e^2, 1, e^2] / (2e^2 + 1)
    got = attention_received(queries, keys, allowed, weights, scaling=2.0)
    e2 = e**2
    z2 = 2 * e2 + 1
    expected = torch.tensor([[(e2 + 1) / (2 * z2), (e2 + 1) / (2 * z2), e2 / z2]])
    assert torch.allclose(got, expected, atol=1e-7)


def test_attention_received_masked_key_gets_nothing():
    queries = torch.tensor([[[[1.0, 0.0]], [[0.0, 1.0]]]])
    keys = torch.tensor([[[[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]]])
    allowed = bools([[[T, F, T]]])
    got = attention_received(queries, keys, allowed, torch.ones(1, 1), scaling=1.0)
    e = math.e
    # head 0: logits [1, -, 1] -> [.5, 0, .5]; head 1: [0, -, 1] -> [1, 0, e] / (1 + e)
    expected = torch.tensor([[(0.5 + 1 / (1 + e)) / 2, 0.0, (0.5 + e / (1 + e)) / 2]])
    assert torch.allclose(got, expected, atol=1e-7)


def _direct(queries, keys, allowed, weights, scaling, kv_head=None):
    """Loop reference. By default the grouped-query rule of transformers' repeat_kv: query head h uses key
    head h // (H / Hkv)."""
    batch, heads, nq, _ = queries.shape
    kv_heads, nk = keys.shape[1], keys.shape[2]
    kv_head = kv_head or (lambda h: h // (heads // kv_heads))
    out = torch.zeros(batch, nk, dtype=torch.float64)
    for b in range(batch):
        for h in range(heads):
            for i in range(nq):
                logits = [
                    float(queries[b, h, i] @ keys[b, kv_head(h), j]) * scaling if allowed[b, i, j] else None
                    for j in range(nk)
                ]
                top = max(v for v in logits if v is not None)
                exps = [0.0 if v is None else math.exp(v - top) for v in logits]
                total = sum(exps)
                for j in range(nk):
                    out[b, j] += float(weights[b, i]) * exps[j] / total / heads
    return out


def test_attention_received_gqa_head_grouping_and_weighted_queries():
    generator = torch.Generator().manual_seed(0)
    queries = torch.randn(2, 4, 2, 3, generator=generator)  # H=4
    keys = torch.randn(2, 2, 5, 3, generator=generator)  # Hkv=2: heads 0,1 -> kv 0; heads 2,3 -> kv 1
    allowed = bools(
        [
            [[T, T, T, F, F], [T, T, T, T, F]],
            [[F, T, T, T, F], [F, T, T, T, T]],
        ]
    )
    weights = torch.tensor([[0.25, 0.75], [0.5, 0.5]])
    got = attention_received(queries, keys, allowed, weights, scaling=0.7)
    expected = _direct(queries, keys, allowed, weights, 0.7)
    assert torch.allclose(got.double(), expected, atol=1e-6)
    # the example tells the right grouping from `repeat` (head h -> kv h % Hkv)
    wrong = _direct(queries, keys, allowed, weights, 0.7, kv_head=lambda h: h % 2)
    assert not torch.allclose(wrong, expected, atol=1e-3)


def test_attention_received_zero_weight_rows_contribute_nothing():
    """A query row with weight 0 (padding of a ragged query set) must not change the result, even when all its
    keys are masked (a left-padding slot): the weighted mean ignores it."""
    generator = torch.Generator().manual_seed(1)
    queries = torch.randn(1, 2, 2, 4, generator=generator)
    keys = torch.randn(1, 1, 4, 4, generator=generator)
    weights = torch.tensor([[1.0, 0.0]])
    real_only = attention_received(queries[:, :, :1], keys, bools([[[F, T, T, T]]]), weights[:, :1], 0.5)
    allowed = bools([[[F, T, T, T], [F, F, F, F]]])  # row 1: a padding query that may see nothing
    got = attention_received(queries, keys, allowed, weights, 0.5)
    assert torch.isfinite(got).all()
    assert torch.allclose(got, real_only, atol=1e-7)


# -- masks ---------------------------------------------------------------------------------------------------


def test_allowed_keys_with_cache_gaps_and_padding():
    # cache holds logical positions 0 and 2 (2 is padding); this forward's queries are positions 5 and 7
    query_order = torch.tensor([[5, 7]])
    key_order = torch.tensor([[0, 2, 5, 7]])
    key_ok = bools([[T, F, T, T]])
    allowed = allowed_keys(query_order, key_order, key_ok, num_cached=2)
    assert allowed.tolist() == [[[T, F, T, F], [T, F, T, T]]]


def test_allowed_keys_left_padding_every_query_sees_itself():
    query_order = torch.tensor([[0, 1, 2], [0, 1, 2]])
    key_order = query_order.clone()
    key_ok = bools([[F, T, T], [T, T, T]])
    allowed = allowed_keys(query_order, key_order, key_ok, num_cached=0)
    assert allowed.tolist() == [
        [[T, F, F], [F, T, F], [F, T, T]],  # padding query 0 sees only itself (no all-masked row)
        [[T, F, F], [T, T, F], [T, T, T]],
    ]


def test_allowed_keys_shortened_sequence_is_causal_by_logical_position():
    # kept slots hold positions 0, 3, 4 of the input (1 and 2 were dropped); no cache
    order = torch.tensor([[0, 3, 4]])
    allowed = allowed_keys(order, order, bools([[T, T, T]]), num_cached=0)
    assert allowed.tolist() == [[[T, F, F], [T, T, F], [T, T, T]]]


def test_to_implementation():
    allowed = bools([[[T, F], [T, T]]])
    sdpa = to_implementation(allowed, "sdpa", torch.float32)
    assert sdpa.dtype == torch.bool and sdpa.shape == (1, 1, 2, 2)
    assert sdpa.tolist() == [[[[T, F], [T, T]]]]
    eager = to_implementation(allowed, "eager", torch.float16)
    assert eager.dtype == torch.float16 and eager.shape == (1, 1, 2, 2)
    low = torch.finfo(torch.float16).min
    assert eager.tolist() == [[[[0.0, low], [0.0, 0.0]]]]
