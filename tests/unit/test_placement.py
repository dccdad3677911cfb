"""Cache-affine placement's pure parts (gateway/placement.py): a job's affinity digests, and the
choice of a worker with bounded load."""

from common.engine_registry import WorkerLoad
from gateway.placement import PREFERRED, SPILLED, UNMATCHED, affinity_of, balance, choose


def load(worker: str, running: int, capacity: int = 8) -> WorkerLoad:
    return WorkerLoad(
        stream=f"chat:jobs:{{m#0}}:w:{worker}", block_size=4, running=running, capacity=capacity
    )


def test_a_prompt_is_keyed_by_its_leading_1_2_4_blocks_and_all_of_them() -> None:
    affinity = affinity_of(list(range(23)), block_size=4)  # 5 whole blocks and 3 tokens
    assert affinity is not None
    assert len(affinity.digests) == 4  # 1, 2, 4 and 5 blocks: the 3 tokens past them are not cached
    assert affinity.tag == affinity.digests[0]
    assert len(set(affinity.digests)) == 4


def test_the_next_turn_of_a_conversation_shares_the_digests_of_the_turn_before() -> None:
    turn = list(range(23))
    next_turn = [*turn, *range(100, 115)]  # the reply and a new message appended: 9 blocks
    first, second = affinity_of(turn, 4), affinity_of(next_turn, 4)
    assert first is not None and second is not None
    assert second.digests[:3] == first.digests[:3]  # 1, 2, 4 blocks
    assert second.digests[3] not in first.digests  # 8 blocks: turn 1 had only 5
    assert second.tag == first.tag  # one slot for the whole conversation


def test_prompts_that_differ_in_their_first_block_share_nothing() -> None:
    one, other = affinity_of(list(range(16)), 4), affinity_of([99, *range(1, 16)], 4)
    assert one is not None and other is not None
    assert not set(one.digests) & set(other.digests)


def test_a_prompt_shorter_than_a_block_has_no_affinity() -> None:
    assert affinity_of([1, 2, 3], block_size=4) is None


def test_a_callers_key_is_the_shortest_match_before_the_prompts_own() -> None:
    short, long = (
        affinity_of([1, 2, 3], 4, "conversation-7"),
        affinity_of(list(range(23)), 4, "conversation-7"),
    )
    other = affinity_of([1, 2, 3], 4, "conversation-8")
    unkeyed = affinity_of(list(range(23)), 4)
    assert short is not None and long is not None and other is not None and unkeyed is not None
    assert len(short.digests) == 1 and short.digests != other.digests
    assert long.digests == (short.digests[0], *unkeyed.digests)  # the key, then the prefixes
    assert long.tag == short.tag  # one slot per key: one MGET reads them all


def test_the_worker_of_the_longest_match_is_preferred() -> None:
    loads = {"w1": load("w1", 0), "w2": load("w2", 0)}
    target, outcome = choose(["w2", None, "w1"], loads, sequences=1, epsilon=0.25)
    assert outcome == PREFERRED and target is not None
    assert target.worker_id == "w1" and target.stream == loads["w1"].stream and target.room == 8


def test_a_worker_above_its_share_of_the_load_spills_to_a_shorter_match() -> None:
    # 4 + 0 running on 2 workers: the bound is ceil(1.25 x (4 + 1) / 2) = 4, and w1 would run 5.
    loads = {"w1": load("w1", 4), "w2": load("w2", 0)}
    target, outcome = choose(["w2", "w1"], loads, sequences=1, epsilon=0.25)
    assert outcome == SPILLED and target is not None and target.worker_id == "w2"
    assert choose([None, "w1"], loads, sequences=1, epsilon=0.25) == (None, SPILLED)
    # 3 + 0 running: the bound is ceil(1.25 x 4 / 2) = 3, and w1 would run 4; with 3 + 2 it is 4.
    assert choose(["w1"], {"w1": load("w1", 3), "w2": load("w2", 0)}, 1, 0.25) == (None, SPILLED)
    target, _ = choose(["w1"], {"w1": load("w1", 3), "w2": load("w2", 2)}, 1, 0.25)
    assert target is not None and target.worker_id == "w1"


def test_a_full_worker_is_not_placed_on_whatever_the_bound() -> None:
    loads = {"w1": load("w1", 7), "w2": load("w2", 8)}
    assert choose(["w1"], loads, sequences=2, epsilon=10.0) == (None, SPILLED)
    target, _ = choose(["w1"], loads, sequences=1, epsilon=10.0)
    assert target is not None and target.room == 1


def test_no_match_and_matches_of_workers_no_longer_live_go_anywhere() -> None:
    loads = {"w1": load("w1", 0), "w2": load("w2", 0)}
    assert choose([None, None], loads, 1, 0.25) == (None, UNMATCHED)
    assert choose(["gone"], loads, 1, 0.25) == (None, UNMATCHED)  # its cache went with it


def test_a_new_conversation_goes_to_the_worker_holding_the_fewest_under_the_bound() -> None:
    loads = {"w1": load("w1", 0), "w2": load("w2", 0), "w3": load("w3", 0)}
    target = balance(loads, {"w1": 3, "w2": 1, "w3": 2}, sequences=1, epsilon=0.25)
    assert target is not None and (target.worker_id, target.outcome, target.room) == ("w2", UNMATCHED, 8)
    # A tie goes to the less loaded.
    loads = {"w1": load("w1", 2), "w2": load("w2", 1), "w3": load("w3", 1)}
    target = balance(loads, {"w1": 1, "w2": 1, "w3": 1}, 1, epsilon=10.0)
    assert target is not None and target.worker_id == "w2"
    # A worker over the bound (ceil(1.25 x 4 / 3) = 2) gets none, however few it holds.
    loads = {"w1": load("w1", 0), "w2": load("w2", 3), "w3": load("w3", 0)}
    target = balance(loads, {"w1": 3, "w2": 0, "w3": 2}, 1, 0.25)
    assert target is not None and target.worker_id == "w3"
    assert balance({"w1": load("w1", 8), "w2": load("w2", 8)}, {}, 1, 10.0) is None  # all full


def test_a_conversation_is_known_by_its_first_block_with_or_without_a_key() -> None:
    prompt = list(range(12))
    unkeyed, keyed = affinity_of(prompt, 4), affinity_of(prompt, 4, caller_key="k")
    assert unkeyed is not None and keyed is not None
    assert unkeyed.conversation == keyed.conversation == unkeyed.digests[0]
    only_key = affinity_of([1, 2], 4, caller_key="k")
    assert only_key is not None and only_key.conversation == only_key.digests[0]
