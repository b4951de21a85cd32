"""ShapesWorld: the world's ground truth matches its frames; prompts parse and round-trip."""

import itertools
import json

import numpy as np
import pytest

from cliploom.shapesworld import (
    PromptSpec,
    make_prompt,
    parse_prompt,
    render_reference,
    sample_clip,
    sample_sequence,
    scene_from_prompt,
    vocab,
    words,
)
from cliploom.shapesworld import world
from cliploom.shapesworld.color import delta_e76, delta_e2000
from cliploom.shapesworld.vocab import BACKGROUND_COLORS, MOTIONS, SHAPES, SIZES, SUBJECT_COLORS


def subject_alpha(seq, frames):
    """Per-pixel subject coverage recovered from the frames, knowing the background image."""
    bg = seq.background_image().astype(np.float64)
    color = np.array(SUBJECT_COLORS[seq.appearance.color], dtype=np.float64)
    d = color - bg
    return np.clip(((frames.astype(np.float64) - bg) * d).sum(-1) / (d * d).sum(-1), 0, 1)


SEQUENCES = [sample_clip(s) for s in range(12)] + [sample_sequence(100 + s, 3) for s in range(4)]


@pytest.mark.parametrize("seq", SEQUENCES, ids=lambda s: s.prompts[0])
def test_ground_truth_matches_frames(seq):
    frames = seq.frames()
    gt = seq.ground_truth()
    assert frames.shape == (seq.num_frames, 32, 32, 3) and frames.dtype == np.uint8
    alpha = subject_alpha(seq, frames)
    ys, xs = np.mgrid[0:32, 0:32] + 0.5
    for k in range(0, seq.num_frames, 4):
        cx, cy = gt["center"][k]
        # the pixel under the ground-truth centre is pure subject colour
        assert tuple(frames[k, int(cy), int(cx)]) == tuple(gt["color"][k])
        # the centroid of subject coverage is the ground-truth centre
        a = alpha[k]
        centroid = np.array([(a * xs).sum(), (a * ys).sum()]) / a.sum()
        assert np.abs(centroid - gt["center"][k]).max() < 0.5, (k, centroid, gt["center"][k])
        # the subject's area matches its size
        expected_area = {"circle": np.pi, "square": 4.0, "triangle": 3 * np.sqrt(3) / 4 * 1.3**2}[
            seq.appearance.shape
        ] * gt["radius"][k] ** 2
        assert abs(a.sum() - expected_area) / expected_area < 0.05
    # far from subject and distractor, on an unstriped column, a pixel is the background colour
    far = np.ones((32, 32), dtype=bool)
    far &= alpha.max(0) == 0
    if not np.isnan(gt["distractor"][0, 0]):
        dx, dy = gt["distractor"][0]
        far &= (np.abs(xs - dx) > 3) | (np.abs(ys - dy) > 3)
    far[:, 4:8] = far[:, 12:16] = far[:, 20:24] = far[:, 28:32] = False  # stripe columns
    assert far.any()
    assert (frames[:, far] == gt["background"][0]).all()


def test_distractor_is_drawn_where_ground_truth_says():
    seq = scene_from_prompt("a small red circle moves left on a black background with a gray block")
    gt = seq.ground_truth()
    dx, dy = gt["distractor"][0]
    frame = seq.frames(0, 1)[0]
    assert tuple(frame[int(dy), int(dx)]) == (180, 180, 180)
    assert np.isnan(scene_from_prompt("a small red circle moves left on a black background").ground_truth()["distractor"]).all()


def test_other_sizes_scale_geometry():
    seq = scene_from_prompt("a big blue square moves down on a striped olive background", size=64)
    frames = seq.frames()
    gt = seq.ground_truth()
    assert frames.shape == (33, 64, 64, 3)
    assert gt["radius"][0] == 12.0
    alpha = subject_alpha(seq, frames)
    ys, xs = np.mgrid[0:64, 0:64] + 0.5
    for k in (0, 16, 32):
        a = alpha[k]
        c = np.array([(a * xs).sum(), (a * ys).sum()]) / a.sum()
        assert np.abs(c - gt["center"][k]).max() < 0.5
    assert gt["center"][32][1] - gt["center"][0][1] == pytest.approx(2 * world.SPEED * 32)


def test_motion_is_clearly_visible_and_prompted_direction():
    for motion, sign in [("left", (-1, 0)), ("right", (1, 0)), ("up", (0, -1)), ("down", (0, 1)), ("still", (0, 0))]:
        seq = scene_from_prompt(f"a small green triangle {MOTIONS[motion]} on a navy background")
        c = seq.ground_truth()["center"]
        d = c[-1] - c[0]
        assert np.allclose(d, np.array(sign) * world.SPEED * 32)
    c = scene_from_prompt("a small green circle bounces on a navy background").ground_truth()["center"]
    assert np.ptp(c[:, 0]) == 0 and np.ptp(c[:, 1]) == pytest.approx(world.BOUNCE_HEIGHT, abs=0.05)


def test_determinism_per_seed():
    a, b, c = sample_clip(7).frames(), sample_clip(7).frames(), sample_clip(8).frames()
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    s1, s2 = sample_sequence(3, 6), sample_sequence(3, 6)
    assert s1.prompts == s2.prompts and np.array_equal(s1.frames(), s2.frames())
    assert np.array_equal(np.asarray(render_reference("a big red circle moves left on a gray background")),
                          np.asarray(render_reference("a big red circle moves left on a gray background")))


def test_long_sequences_change_motion_at_boundaries_and_stay_in_frame():
    changes = 0
    for seed in range(20):
        seq = sample_sequence(seed, 8, 33)
        gt = seq.ground_truth()
        lo, hi = world.bounds(seq.appearance)
        assert (gt["center"] >= lo - 1e-9).all() and (gt["center"] <= hi + 1e-9).all()
        segs = seq.segments
        assert [s.prompt for s in segs] == seq.prompts and len(segs) == 8
        assert segs[0].start == 0 and segs[-1].stop == seq.num_frames == 8 * 33
        for s in segs:
            # no clamping: every segment moves exactly as its prompt says
            c = gt["center"][s.start : s.stop]
            expected = c[0] + world.motion_offset(s.motion, np.arange(s.frames))
            assert np.allclose(c, expected), (seed, s)
            assert parse_prompt(s.prompt).motion == s.motion
            assert parse_prompt(s.prompt).with_motion("still") == seq.appearance.with_motion("still")
        steps = np.abs(np.diff(gt["center"], axis=0)).max()
        assert steps <= 1.0  # positions are continuous across boundaries
        changes += sum(a.motion != b.motion for a, b in zip(segs, segs[1:]))
    assert changes > 50


def test_wall_prob_runs_some_moves_into_the_frame_edge_where_the_subject_stops():
    stopped = moved_on = 0
    for seed in range(40):
        plain = sample_sequence(seed, 4, 17)
        assert plain.motions == sample_sequence(seed, 4, 17, wall_prob=0.0).motions  # the default draws as before
        seq = sample_sequence(seed, 4, 17, wall_prob=1.0)
        assert seq.motions[0] == plain.motions[0]  # the first segment is always a free move
        gt = seq.ground_truth()["center"]
        lo, hi = world.bounds(seq.appearance)
        assert (gt >= lo - 1e-9).all() and (gt <= hi + 1e-9).all()
        assert np.abs(np.diff(gt, axis=0)).max() <= 1.0  # still continuous across boundaries
        for s in seq.segments[1:]:
            c = gt[s.start : s.stop]
            free = c[0] + world.motion_offset(s.motion, np.arange(s.frames))
            if np.allclose(c, free):
                moved_on += 1
                continue
            # a wall segment: a directional move, the subject on the edge at its end, never past it
            assert s.motion in ("left", "right", "up", "down"), (seed, s)
            axis = 0 if s.motion in ("left", "right") else 1
            edge = hi if s.motion in ("right", "down") else lo
            assert c[-1, axis] == pytest.approx(edge)
            steps = np.diff(c[:, axis]) * (1 if edge == hi else -1)
            assert np.all(np.diff(steps) <= 1e-9) and steps.min() >= -1e-9  # full speed, then stopped for good
            assert np.allclose(c[:, 1 - axis], c[0, 1 - axis])
            stopped += 1
    # with wall_prob 1 every later segment that has a wall move to take takes one
    assert stopped > 60 and moved_on < stopped


def test_wall_move_nearest_heads_for_the_nearest_edge_and_stays_against_it():
    against = 0
    for seed in range(30):
        seq = sample_sequence(seed, 4, 17, wall_prob=1.0, wall_move="nearest")
        c = seq.ground_truth()["center"]
        lo, hi = world.bounds(seq.appearance)
        for s in seq.segments[1:]:
            start = c[s.start]
            walls = [m for m in ("left", "right", "up", "down") if not world.feasible(seq.appearance, m, 17, start)]
            if not walls:
                continue
            rooms = {m: world.room(m, start, lo, hi) for m in walls}
            assert s.motion in walls and rooms[s.motion] == min(rooms.values()), (seed, s, rooms)
            against += rooms[s.motion] < 1e-9  # a later wall segment starts on the edge it is told to go into
    assert against > 20
    with pytest.raises(ValueError, match="wall_move"):
        sample_sequence(0, 2, 17, wall_prob=1.0, wall_move="far")


def test_prompt_round_trip():
    for color, shape, motion, bg, size, striped, distractor in itertools.islice(
        itertools.product(SUBJECT_COLORS, SHAPES, MOTIONS, BACKGROUND_COLORS, SIZES, (False, True), (False, True)),
        0, None, 7,
    ):
        spec = PromptSpec(color, shape, motion, bg, size, striped, distractor)
        text = make_prompt(spec)
        assert parse_prompt(text) == spec
        assert make_prompt(parse_prompt(text)) == text
        assert set(text.split()) <= set(words())


def test_parse_is_forgiving_about_case_and_size():
    spec = parse_prompt("A red circle moves left on a striped navy background.")
    assert spec == PromptSpec("red", "circle", "left", "navy", "big", True, False)
    assert parse_prompt("a small pink triangle stays still on a teal background with a gray block").distractor


@pytest.mark.parametrize(
    "prompt, bad",
    [
        ("a big mauve circle moves left on a navy background", "'mauve'"),
        ("a big red hexagon moves left on a navy background", "'hexagon'"),
        ("a big red circle moves sideways on a navy background", "'sideways'"),
        ("a big red circle moves left on a red background", "'red'"),
        ("a big red circle moves left on a navy", "end of prompt"),
        ("a big red circle moves left on a navy background please", "'please'"),
        ("", "empty"),
    ],
)
def test_bad_prompts_raise_one_line_errors_naming_the_word(prompt, bad):
    with pytest.raises(ValueError) as err:
        parse_prompt(prompt)
    msg = str(err.value)
    assert bad in msg and "\n" not in msg


def test_unknown_word_error_lists_the_valid_words():
    with pytest.raises(ValueError, match="red, orange, yellow"):
        parse_prompt("a big mauve circle moves left on a navy background")


def test_vocab_is_json_and_complete():
    v = json.loads(json.dumps(vocab()))
    assert set(v) >= {"shapes", "colors", "sizes", "backgrounds", "motions", "template"}
    assert len(v["shapes"]) >= 3 and len(v["colors"]) >= 6
    assert {"moves left", "moves right", "moves up", "moves down", "stays still", "bounces"} <= set(v["motions"].values())
    assert parse_prompt(v["example"])


def test_palette_is_well_separated():
    subj = list(SUBJECT_COLORS.values())
    bgs = list(BACKGROUND_COLORS.values())
    pair = [delta_e76(a, b) for a, b in itertools.combinations(subj, 2)]
    assert min(pair) > 30
    assert min(delta_e76(a, b) for a in subj for b in bgs) > 40


def test_delta_e2000_reference_values():
    from cliploom.shapesworld.color import delta_e2000_lab, srgb_to_lab

    # pairs 1 and 7 of Sharma, Wu & Dalal (2005), the CIEDE2000 test data
    assert delta_e2000_lab([50.0, 2.6772, -79.7751], [50.0, 0.0, -82.7485]) == pytest.approx(2.0425, abs=1e-4)
    assert delta_e2000_lab([50.0, 0.0, 0.0], [50.0, -1.0, 2.0]) == pytest.approx(2.3669, abs=1e-4)

    assert np.allclose(srgb_to_lab([255, 255, 255]), [100, 0, 0], atol=0.01)
    assert np.allclose(srgb_to_lab([0, 0, 0]), [0, 0, 0], atol=0.01)
    assert delta_e2000([200, 30, 30], [200, 30, 30]) == pytest.approx(0.0)
    assert 0 < delta_e2000([200, 30, 30], [205, 35, 30]) < delta_e2000([200, 30, 30], [230, 60, 30])


def test_render_reference_is_the_first_frame():
    img = render_reference("a small yellow square moves up on a striped maroon background", size=48)
    assert img.size == (48, 48) and img.mode == "RGB"
    seq = scene_from_prompt("a small yellow square moves up on a striped maroon background", size=48)
    assert np.array_equal(np.asarray(img), seq.frames(0, 1)[0])
    with pytest.raises(ValueError, match="'hexagon'"):
        render_reference("a small yellow hexagon moves up on a maroon background")


def test_a_sequence_renders_a_given_track():
    """``track`` places the subject per frame (a path measured elsewhere); the wrong shape is refused."""
    import numpy as np

    from cliploom.evaluate import subject_centroids
    from cliploom.shapesworld import world

    seq = world.sample_sequence(3, 2, [5, 5], size=32)
    track = np.stack([np.linspace(10, 20, 10), np.full(10, 16.0)], axis=1)
    drawn = world.Sequence(seq.appearance, seq.motions, seq.lengths, seq.start, seq.distractor, 32, track=track)
    assert np.array_equal(drawn.centers_ref(), track)
    # rendered anti-aliased, the tracker finds each centre within a fraction of a pixel
    assert np.abs(subject_centroids(drawn.frames(), seq.appearance) - track).max() < 0.75
    with pytest.raises(ValueError, match="one \\(x, y\\) per frame"):
        world.Sequence(seq.appearance, seq.motions, seq.lengths, seq.start, seq.distractor, 32, track=track[:4])
