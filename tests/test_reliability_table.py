"""The table of faults and hostile inputs in RELIABILITY.md, rendered from FAULTS; each row names the tests
that inject the fault and assert the outcome. The tests here fail when the table, the rows and the tests
drift apart: a row whose test is gone, a reliability test without a row, or a stale table.

    python -m tests.test_reliability_table        # rewrite the table in RELIABILITY.md after editing FAULTS

Adding a fault (serve, dashboard, platform ...): write its test in tests/test_reliability_<area>.py, add a
row here, run the command above.
"""
from __future__ import annotations

import ast
import re
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DOC = REPO / "RELIABILITY.md"
BEGIN = "<!-- faults table: generated from tests/test_reliability_table.py, do not edit by hand -->"
END = "<!-- end of faults table -->"


@dataclass(frozen=True)
class Fault:
    area: str
    fault: str  # what was injected or fed in
    outcome: str  # what the tests assert
    tests: tuple[str, ...]  # "tests/FILE.py::test_name" (a parametrised case as test_name[id])


KILL = "tests/test_reliability_kill.py::"
STORAGE = "tests/test_reliability_storage.py::"
NUMERIC = "tests/test_reliability_numeric.py::"
INPUTS = "tests/test_reliability_inputs.py::"
BAD_INPUT = "tests/test_bad_input.py::"
E2E = "tests/test_train_e2e.py::"
PLATFORM = "tests/test_reliability_platform.py::"
SERVE = "tests/test_reliability_serve.py::"
SERVE_PLATFORM = "tests/test_serve_platform.py::"
SERVE_HTTP = "tests/test_serve_http.py::"
DASHBOARD_LOCAL = "tests/test_dashboard_local.py::"
DASHBOARD_PLATFORM = "tests/test_dashboard_platform.py::"

FAULTS = [
    Fault("crash", "`SIGKILL` of a seeded CPU run inside epoch 2 of 3, then `--resume`",
          "Resumes at the last completed epoch; final weights, every checkpoint and `metrics.jsonl` are bitwise "
          "equal to the uninterrupted run",
          (KILL + "test_sigkill_mid_epoch_then_resume_equals_uninterrupted",)),
    Fault("crash", "`SIGKILL` during saves, three times with `--resume` after each: the moment a checkpoint save "
                   "is under way (its temporary file is left behind: the kill landed mid-save), at a random moment, "
                   "and at a random moment up to 50 ms into a save",
          "After every kill each file under its final name loads (state dicts, resume state, JSON, "
          "`metrics.jsonl`, PNG); leftover temporary files are removed on resume; the result is bitwise equal",
          (KILL + "test_sigkill_during_saves_leaves_no_truncated_file",)),
    Fault("crash", "`SIGTERM` inside epoch 2",
          "Stops after the current iteration, exit code 0: `model_002_last.pth` saved with the weights trained so "
          "far, `summary.json` says `stopped`, no temporary files; `--resume` redoes epoch 2 and ends bitwise equal",
          (KILL + "test_sigterm_mid_epoch_stops_cleanly_then_resume_equals_uninterrupted",)),
    Fault("crash", "Exception after an epoch is logged but before its resume state is saved; stop between epochs",
          "`--resume` logs every epoch once and ends with bitwise-equal weights",
          (E2E + "test_stop_and_crash_then_resume_equal_the_uninterrupted_run",)),
    Fault("crash", "Stop during the first epoch",
          "`model_001_last.pth` saved; `--resume` refuses with \"ended before its first epoch; start it anew\"",
          (E2E + "test_stop_during_first_epoch",)),
    Fault("crash", "The dashboard's Stop during a 40-epoch run",
          "Phase `stopped`: `summary.json` says `stopped` before epoch 40, its last checkpoint exists, the card shows "
          "where the run is; restarting a step while it runs is refused; Stop when idle: \"Nothing to stop\"",
          (DASHBOARD_LOCAL + "test_stop_ends_cleanly_with_the_last_checkpoint",)),
    Fault("numeric", "NaN loss at epoch 2, iteration 2",
          "Stops: \"loss became nan at epoch 2, iteration 2\"; epoch-1 checkpoints kept; `summary.json` `failed`",
          (E2E + "test_non_finite_loss_raises_and_keeps_checkpoints",)),
    Fault("numeric", "Infinite loss at the last iteration of epoch 2",
          "Exit code 3, `error: loss became inf at epoch 2, iteration 3`; only epoch-1 checkpoints, all finite",
          (NUMERIC + "test_non_finite_stops_naming_epoch_and_iteration[inf-loss]",)),
    Fault("numeric", "Finite loss but infinite gradients at the last iteration of epoch 2",
          "Exit code 3, `error: gradient became nan at epoch 2, iteration 3 (the loss was finite)`; the step is "
          "not taken, so no checkpoint holds NaN weights",
          (NUMERIC + "test_non_finite_stops_naming_epoch_and_iteration[inf-gradient]",)),
    Fault("numeric", "`--amp fp16`: gradients overflow under the gradient scaler",
          "The scaler skips the step (weights unchanged); each skip reaches `on_skip`, the epoch's count is "
          "recorded as `amp_skipped_steps` in `metrics.jsonl` and reported as a warning naming the iterations. "
          "Gradients that stay inf/NaN (the scale halved under 2^-16) stop the run with `NonFiniteLoss` naming "
          "epoch and iteration, weights unchanged",
          ("tests/test_fast_path.py::test_fp16_scaler_skips_are_reported",
           "tests/test_fast_path.py::test_fp16_gradients_that_stay_nan_stop_the_run")),
    Fault("storage", "Read-only `--output` (read-only mount)",
          "Before any image is decoded: `--output: cannot write to DIR (read-only or no permission)`, exit code 2",
          (STORAGE + "test_read_only_output_fails_before_training",)),
    Fault("storage", "Too little free space for the run's checkpoints",
          "Before training: `--output: DIR has N MB free, but this run's checkpoints need about M MB; ...`, "
          "exit code 2, nothing written",
          (STORAGE + "test_too_little_space_fails_before_training",)),
    Fault("storage", "Output folder remounted read-only after epoch 1",
          "`StorageError`: `cannot write .../info/metrics.jsonl: Read-only file system; the checkpoints saved so far "
          "are intact in DIR; once it can be written, continue with --resume RUN`; the reporter still gets "
          "`finish` (status `failed`); epoch-1 checkpoints and resume state load; once writable, `--resume` finishes",
          (STORAGE + "test_output_becomes_read_only_during_training",)),
    Fault("storage", "Disk filled by another program after epoch 1",
          "`StorageError`: `cannot write .../model_002.pth: No space left on device; ...`; the partial temporary file "
          "is deleted, epoch-1 files intact, `summary.json` `failed`; after freeing space `--resume` finishes",
          (STORAGE + "test_disk_fills_during_training_then_resume_finishes",)),
    Fault("storage", "`--cache-dir` too small for the decoded-image cache",
          "`--cache-dir DIR: no room for the decoded-image cache (N MB): No space left on device` "
          "(before: killed by SIGBUS)",
          (STORAGE + "test_full_cache_folder_is_a_clear_error",)),
    Fault("platform", "Project download (dashboard): a dropped connection, a stalled request (dropped after 0.5 s), "
                      "a 503, then a 500 and a 504 on the same request (the SDK's retries used up)",
          "Each retried by the SDK; on the last the app downloads the project again: \"Project ready: downloaded.\", "
          "every image byte-identical",
          (PLATFORM + "test_download_retries_drops_5xx_and_timeouts",)),
    Fault("platform", "Project download failing on every try (500)",
          "Bounded: SDK retries x 3 downloads, then `downloading the project failed: Retry limit exceeded ...` on "
          "the card; no cache marker (never taken for a current copy); the next click downloads it",
          (PLATFORM + "test_download_retries_drops_5xx_and_timeouts",)),
    Fault("platform", "Artifact upload: a dropped connection, a lost answer (files stored, 502 returned), a 500 on "
                      "the listing; the Team Files folder already taken; later a client read timeout (server stalls)",
          "Uploaded to `/unet/42_exp_000/` (named as the SDK names it), byte-identical; every path stored exactly "
          "once, no `_001`: the batch whose answer was lost is not sent again; task output set",
          (PLATFORM + "test_upload_retries_and_never_stores_a_file_twice",)),
    Fault("platform", "Artifact upload: 503 on every try after the first batch",
          "Gives up after the retry count of failures in a row, exit code 1: `uploading the artifacts to ... failed "
          "2 time(s) in a row: 503 ...; The artifacts are kept in RUN; upload them later with:` and the command; "
          "the run folder unchanged; the printed command completes the same folder, the first batch not re-sent",
          (PLATFORM + "test_upload_gives_up_keeps_the_run_and_prints_the_command",)),
    Fault("platform", "Dashboard upload after training, dropped on every try",
          "Phase `upload failed`; the card names the kept run folder and the command; the command uploads it and "
          "sets the task output",
          (DASHBOARD_PLATFORM + "test_upload_that_gives_up_keeps_the_run_and_shows_the_command",)),
    Fault("platform", "Dashboard: a step restarted after an upload that gave up",
          "Answers: every progress bar of the SDK's widget is closed when its work ends or fails. Before, the "
          "failed upload's bar was left to the garbage collector, whose close on the server's event loop waits "
          "for that loop: the app stopped answering (seen in this test)",
          (DASHBOARD_PLATFORM + "test_custom_weights_from_team_files_bring_their_classes",)),
    Fault("platform", "Dashboard, after the upload: the Model Benchmark fails (the platform answers 400 to its "
                      "image listing) and the platform refuses `set_output_experiment`",
          "The run is uploaded and the task output names its folder; the card keeps its phase `finished` and "
          "says both: `The Model Benchmark failed: ... finding the validation images on the platform failed ...` "
          "and `The run is uploaded but not in the Experiments table: ...`; no report link; the app does not stop "
          "itself, so the card can be read",
          (DASHBOARD_PLATFORM + "test_a_failed_benchmark_and_a_refused_experiment_keep_the_uploaded_run",)),
    Fault("network", "ImageNet encoder weights asked for with no network (`--encoder-weights imagenet`, empty torch "
                     "cache, downloads refused)",
          "Exit code 2 before anything is written: the message names the file to fetch, where to put it, "
          "`--encoder-weights FILE` and `none`. With `auto`: a warning saying the same, and the run trains from scratch",
          (BAD_INPUT + "test_cli_reports_bad_input_with_exit_code_2",
           BAD_INPUT + "test_imagenet_weights_offline_train_from_scratch_with_auto")),
    Fault("network", "A download of ImageNet weights whose content does not match the hash in its file name",
          "Refused, naming the file; nothing is left in the torch cache",
          ("tests/test_models.py::test_a_corrupt_download_is_refused",)),
    Fault("input", "`--custom-weights` with a classes file that does not describe its head (another class count), or "
                   "with no class in common with the run",
          "Error naming the file and both counts; with no common class, a warning and an untrained head",
          ("tests/test_original_app.py::test_custom_weights_without_a_common_class_start_the_head_untrained",)),
    Fault("serve", "300 generated uploads to `/inference_image`, `/inference_batch` and `/inference_batch_async`: random bytes, truncated or "
                   "corrupted PNGs, PNG headers of any size (0 to 2^32-1), depth and colour type; 0-3 files under "
                   "right or wrong field names and odd file names; settings as random text, any JSON, near-miss "
                   "keys and values",
          "Every answer 2xx, or 4xx with a `message` / `detail`; never a 5xx or a dropped connection",
          (SERVE + "test_fuzzed_uploads_never_crash_the_server",)),
    Fault("serve", "An upload whose `settings` form field holds `{\"settings\": []}` (or another non-object) instead of "
                   "an object of inference settings; found by the fuzzer",
          "400: `\"settings\" must be a JSON object, got []`; before, it passed the check and the SDK's own code "
          "answered 500. `null` still means no settings (200)",
          (SERVE + "test_settings_must_be_an_object_or_null",)),
    Fault("serve", "A request (upload or image id) whose `rectangle` (in the request or in its settings) is `null`, "
                   "malformed JSON, or a rectangle that does not lie inside the image; `null` was found by the fuzzer",
          "`null`: no crop (200); malformed: 400 `rectangle must be null or a Supervisely rectangle …`; outside: 400 "
          "`rectangle (…) does not lie inside a 56x40 image of the request`. Before, the SDK's crop answered 500 "
          "to all three",
          (SERVE + "test_rectangle_is_null_or_a_supervisely_rectangle",
           SERVE_PLATFORM + "test_null_rectangle_and_settings_mean_none",
           SERVE_PLATFORM + "test_bad_id_requests_get_a_4xx_with_a_message")),
    Fault("serve", "Requests by image id (`/inference_image_id`, `/inference_batch_ids`) on a loopback platform: no "
                   "ids, a `null` `batch_ids` beside a good `image_id`, ids that are not positive integers, an id the "
                   "platform does not have, settings that are not an object, unknown settings or `classes`, a "
                   "batch size below 1, no `state` at all",
          "400 naming the field and what is accepted (`no image ids in the request state: give \"image_id\" …`, "
          "`unknown class(es) 'kiwii' in \"classes\"; the model predicts …`); 404 for the unknown id. Before, "
          "the SDK's code answered 500 to most of them, and an unknown class got an answer with no objects",
          (SERVE_PLATFORM + "test_bad_id_requests_get_a_4xx_with_a_message",)),
    Fault("serve", "60 generated request states for the id routes: real and junk ids (any JSON, NaN, Infinity), "
                   "rectangles in and out of the image, near-miss settings, batch sizes; found `null` ids and "
                   "`\"classes\": false` (500s before)",
          "Every answer 2xx, or 4xx with a `message`; never a 5xx",
          (SERVE_PLATFORM + "test_fuzzed_id_requests_never_crash_the_server",)),
    Fault("serve", "`/inference_image_url` with a URL that answers 404, one that is not an image, a `file://` URL, "
                   "no URL",
          "400: `cannot download (404 …)`, `not a readable image`, `\"image_url\" must be an http(s) URL`; "
          "before, 500 to all four",
          (SERVE_PLATFORM + "test_image_url_route",)),
    Fault("serve", "Writing predictions back with an `upload_mode` the SDK does not know (`\"apend\"`), an "
                   "`output_project_id` that is not an id, an `existing_objects_iou_thresh` outside [0, 1]",
          "400 naming the field, and no label changes. Before, the SDK treated any unknown mode as `replace`: "
          "a typo erased every image's own labels",
          (SERVE_PLATFORM + "test_bad_write_back_requests_are_refused_before_any_label_changes",)),
    Fault("serve", "The platform refuses the predictions written back to it (`upload_mode`, `output_project_id`: "
                   "`annotations.bulk.add` answers 400)",
          "The request ends with `writing the predictions to the platform failed: 400 …` and the SDK's client raises it. "
          "Before, the SDK's upload thread dropped the error: a finished request with no results and no error",
          (SERVE_PLATFORM + "test_a_refused_write_of_predictions_fails_the_request",)),
    Fault("serve", "The SDK's clients as they are: `ModelAPI.predict` copies its own arguments (`show_progress`, "
                   "`recursive`, `conf` …) into the settings; `Session.inference_image_ids_async` reads an "
                   "`image_name` the SDK's image-id route does not write",
          "The arguments are accepted and ignored; results by image id carry `image_name`. Before, every "
          "`ModelAPI.predict` call got a 400 for unknown settings, and that `Session` call a `KeyError`",
          (SERVE_PLATFORM + "test_the_sdks_model_api_predicts_by_id_dataset_project_and_file",
           SERVE_PLATFORM + "test_the_sdk_session_client_predicts_platform_images_and_projects_like_the_engine")),
    Fault("serve", "The SDK's sliding window (`inference_mode: sliding_window`, as the platform's apps and `Session` send "
                   "it) with a window of 0 or 64.5 px, a negative overlap, an overlap not less than its window (or "
                   "than the image, when no window size is given), an unknown `borderStrategy` or key, params that "
                   "are not an object, 1x1 windows on a 200x200 image; near-miss `sliding_window_params` in the "
                   "uploads' fuzzer",
          "400 naming the setting (`sliding_window_params.overlapY (32) must be less than "
          "sliding_window_params.windowHeight (32)`, `... scale this 200x200 image to 12800x12800 pixels, more than "
          "the limit ...`); good ones answer our blended sliding window's masks. Before, every `sliding_window` "
          "request got a 400; the SDK's own window step would have stacked overlapping labels of separate "
          "windows, or answered 500 to a window larger than the image",
          (SERVE_HTTP + "test_bad_requests_get_400_with_a_message_and_the_server_keeps_serving",
           SERVE_HTTP + "test_the_sdk_session_client_asks_for_the_sdks_sliding_window",
           SERVE + "test_fuzzed_uploads_never_crash_the_server")),
    Fault("serve", "150 generated bodies for the info, polling and URL routes (random bytes, any JSON, objects whose `context`, "
                   "`state`, `api_token`, `server_address` have any type; any content type) and non-object JSON "
                   "for the platform-only routes",
          "Same; before, the SDK's middleware answered 500 to a JSON body that is not an object or has a "
          "non-object `context` / `state` or a non-string token or address: now a 400 naming the problem",
          (SERVE + "test_fuzzed_json_bodies_never_crash_the_server",)),
    Fault("serve", "JSON requests sent the way `curl -d` sends them (declared as a form), with no body at all, or "
                   "with a body that is not JSON; polling routes with no or an unknown `inference_request_uuid`; "
                   "an image id sent to a server that has no platform",
          "JSON is read as JSON whatever its declared type, an empty body as `{}`; otherwise 415 `the request body "
          "must be a JSON object …`; 400 naming the missing field; 404 `no inference request … on this server`; "
          "400 `image ids need a Supervisely platform …`. Before, the SDK's code answered 500 to each",
          (SERVE + "test_json_routes_read_json_whatever_its_declared_type_and_say_what_is_missing",)),
    Fault("serve", "1,000 requests after a 100-request warm-up: good single, batch and sliding inferences, a "
                   "60000x60000 PNG header, noise, bad settings, a wrong field, a truncated PNG",
          "Server RSS (`/proc/PID/status`) grows less than 40 MB (measured: +2 MB on 1,056 MB); the good ones 200, "
          "the rest 4xx; the server answers afterwards",
          (SERVE + "test_memory_stays_bounded_over_1000_requests",)),
    Fault("input", "0-byte image; image with garbage bytes",
          "Error naming the file: `IMAGE: empty file` / `not a readable image`, nothing written",
          (BAD_INPUT + "test_bad_image_file",)),
    Fault("input", "PNG named `.jpg`", "Handled: decoded by content, pixels equal to the `.png`",
          (INPUTS + "test_png_named_jpg_is_read_by_content",)),
    Fault("input", "16-bit RGB PNG", "Handled: the high byte of each channel, equal to the 8-bit image",
          (INPUTS + "test_16bit_png_becomes_its_8bit_image",)),
    Fault("input", "Greyscale PNG", "Handled: grey copied to R, G and B; mask unchanged",
          (INPUTS + "test_greyscale_png_is_replicated_to_rgb",)),
    Fault("input", "EXIF-rotated JPEG (orientation 6), annotation of the displayed size",
          "Handled: turned upright as the platform shows it; mask aligned",
          (INPUTS + "test_exif_rotated_jpeg_is_upright_and_matches_its_mask",)),
    Fault("input", "EXIF-rotated JPEG whose annotation has the stored (unrotated) size",
          "Error naming annotation, image and both sizes",
          (INPUTS + "test_exif_rotated_jpeg_with_annotation_of_stored_size_names_both",)),
    Fault("input", "Annotation of another size than its image",
          "Error naming annotation, image and both sizes",
          (BAD_INPUT + "test_annotation_size_differs_from_image",)),
    Fault("input", "Annotation with a class not in `meta.json`", "Error naming the annotation and the class",
          (BAD_INPUT + "test_annotation_class_not_in_meta",)),
    Fault("input", "Bitmap partly outside the image", "Handled: clipped to the image",
          (INPUTS + "test_bitmap_partly_outside_the_image_is_clipped",
           "tests/test_data.py::test_rasterize_bitmap_partly_outside_is_clipped")),
    Fault("input", "Same item name in several datasets (incl. a nested one)",
          "Handled: distinct items; the run trains, split files keep `dataset_name` + `item_name`",
          (INPUTS + "test_duplicate_item_names_across_datasets_stay_distinct",)),
    Fault("input", "Non-UTF-8 (Latin-1) annotation JSON", "Error naming the file: `unreadable JSON (... utf-8 ...)`",
          (INPUTS + "test_non_utf8_json_names_the_file[annotation]",)),
    Fault("input", "Non-UTF-8 (Latin-1) `meta.json`", "Error naming the file: `not valid JSON (... utf-8 ...)`",
          (INPUTS + "test_non_utf8_json_names_the_file[meta.json]",)),
    Fault("input", "Truncated JSON annotation", "Error naming the file: `unreadable JSON`",
          (BAD_INPUT + "test_annotation_invalid_json",)),
    Fault("input", "Image without annotation file",
          "Error naming the dataset and item (the SDK alone drops the whole dataset with a log line)",
          (BAD_INPUT + "test_annotation_missing", BAD_INPUT + "test_annotation_missing_in_nested_dataset")),
]


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def render() -> str:
    lines = ["| area | fault or input | outcome | tests |", "|---|---|---|---|"]
    for f in FAULTS:
        tests = "<br>".join(f"`{t.removeprefix('tests/')}`" for t in f.tests)
        lines.append(f"| {f.area} | {_cell(f.fault)} | {_cell(f.outcome)} | {tests} |")
    return "\n".join([BEGIN, *lines, END])


def _test_functions(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    return {node.name for node in tree.body if isinstance(node, ast.FunctionDef) and node.name.startswith("test_")}


def _string_constants(path: Path) -> set[str]:
    return {node.value for node in ast.walk(ast.parse(path.read_text(encoding="utf-8")))
            if isinstance(node, ast.Constant) and isinstance(node.value, str)}


def test_every_row_names_existing_tests():
    missing = []
    for fault in FAULTS:
        for ref in fault.tests:
            file, _, name = ref.partition("::")
            path = REPO / file
            function, _, case = name.partition("[")
            if (not path.is_file() or function not in _test_functions(path)
                    or (case and case.removesuffix("]") not in _string_constants(path))):  # a parametrised case's id
                missing.append(ref)
    assert not missing, f"rows name tests that do not exist: {missing}"


def test_every_reliability_test_has_a_row():
    named = {re.sub(r"\[.*\]$", "", ref) for fault in FAULTS for ref in fault.tests}
    unlisted = [f"{path.relative_to(REPO).as_posix()}::{name}"
                for path in sorted((REPO / "tests").glob("test_reliability*.py")) if path != Path(__file__).resolve()
                for name in sorted(_test_functions(path))
                if f"{path.relative_to(REPO).as_posix()}::{name}" not in named]
    assert not unlisted, f"reliability tests without a row in FAULTS: {unlisted}"


def test_reliability_md_table_is_current():
    text = DOC.read_text(encoding="utf-8")
    assert text.count(BEGIN) == 1 and text.count(END) == 1, f"{DOC} lost its table markers"
    current = text[text.index(BEGIN):text.index(END) + len(END)]
    assert current == render(), f"{DOC} is stale: run python -m tests.test_reliability_table"


def write() -> None:
    text = DOC.read_text(encoding="utf-8")
    DOC.write_text(text[:text.index(BEGIN)] + render() + text[text.index(END) + len(END):], encoding="utf-8")


if __name__ == "__main__":
    write()
    print(f"{DOC}: table of {len(FAULTS)} faults rewritten")
