"""07 Train: the widget state becomes train.py's argv; the engine runs in a worker thread and the
card follows it through DashboardReporter events; artifacts are uploaded (platform) or kept (local)."""
from __future__ import annotations

import html
import json
import logging
import shlex
import threading
import traceback
from dataclasses import dataclass, field
from pathlib import Path

from supervisely.app import StateJson
from supervisely.app.widgets import Button, Container, Field, Flexbox, GridGallery, LinePlot, Progress, Select, Text

from custom_net import sly_seg_dataset as data
from custom_net.config import ArgsError, parse_config
from custom_net.reporting import replay
from custom_net.run_folder import RunFolder
from custom_net.trainer import ui_state_from_config
from custom_net.distributed import DistributedRunError, torchrun_command
from custom_net.sly_integration import (DashboardReporter, Launch, describe_evaluation, settings_to_argv,
                                        start_training)
from train_app import model_benchmark, platform_io, platform_outputs
from train_app.progress import counting
from train_app.run_view import RunView
from train_app.wizard import USER_ERRORS, Step

logger = logging.getLogger("train_dashboard")
ENGINE_ERRORS = (ArgsError, DistributedRunError, *USER_ERRORS)
POLL_SECONDS = 0.3


@dataclass
class Run:
    """One training run started from the card."""
    argv: list[str]
    launch: Launch  # in this process, or several GPUs through torchrun
    reporter: DashboardReporter = field(default_factory=DashboardReporter)
    worker: threading.Thread | None = None
    follower: threading.Thread | None = None
    summary: dict | None = None
    error: str | None = None
    iters_per_epoch: int = 1
    epoch_bar: object = None  # tqdm-like sessions of the Progress widgets
    iter_bar: object = None
    previews: dict = field(default_factory=dict)  # epoch -> split -> [(item name, data url)]
    messages: list[str] = field(default_factory=list)
    location: str | None = None

    @property
    def running(self) -> bool:
        return self.follower is not None and self.follower.is_alive()


class TrainStep(Step):
    number, title = 7, "Training"
    description = "Run, watch, stop; the artifacts are saved at the end"

    def build(self):
        self.run: Run | None = None
        self.train = Button("Train", icon="zmdi zmdi-play", widget_id=self.wid("train"))
        self.stop = Button("Stop", button_type="danger", icon="zmdi zmdi-stop", widget_id=self.wid("stop"))
        self.phase = Text("Not started", status="text", widget_id=self.wid("phase"))  # idle/running/...
        self.command = Text("", status="text", widget_id=self.wid("command"))
        self.epochs = Progress(message="Epochs", show_percents=True, hide_on_finish=False, widget_id=self.wid("epochs"))
        self.iterations = Progress(message="Iterations", show_percents=True, hide_on_finish=False,
                                   widget_id=self.wid("iterations"))
        self.upload = Progress(message="Uploading artifacts", show_percents=True, widget_id=self.wid("upload"))
        self.lr_plot = LinePlot("Learning rate", [], show_legend=False, decimals_in_float=6, widget_id=self.wid("lr"))
        self.loss_plot = LinePlot("Loss", [], widget_id=self.wid("loss"))
        self.metrics_plot = LinePlot("Validation IoU and Dice (foreground mean)", [], widget_id=self.wid("metrics"))
        self.preview_epoch = Select([], placeholder="epoch", widget_id=self.wid("preview_epoch"))
        self.gallery = GridGallery(2, show_opacity_slider=False, widget_id=self.wid("gallery"))
        self.log = Text("", status="text", widget_id=self.wid("log"))
        self.results = Text("", status="text", widget_id=self.wid("results"))  # the best checkpoint
        self.evaluation = Text("", status="text", widget_id=self.wid("eval"))  # headline metrics, report
        self.evaluation.hide()
        self.location = Text("", status="success", widget_id=self.wid("location"))
        self.location.hide()
        self.benchmark = Text("", status="success", widget_id=self.wid("benchmark"))  # the report's link
        self.benchmark.hide()
        self.stop_app = None  # set by the dashboard: ends the task after a platform run
        self.action(self.train)(self._start)
        self.action(self.stop, requires_open=False)(self._stop)
        self.preview_epoch.value_changed(self.show_previews)
        return [Flexbox([self.train, self.stop, self.phase]), self.command, self.epochs, self.iterations,
                Flexbox([self.lr_plot, self.loss_plot, self.metrics_plot]),
                Field(Container([self.preview_epoch, self.gallery]), "Predictions over time",
                      "image | ground truth | prediction, for the train (left) and val (right) preview items"),
                self.log, self.results, self.upload, self.location, self.benchmark, self.evaluation]

    # ---- start / stop
    def output_dir(self) -> Path:
        env = self.session.env
        if env.platform:
            return env.data_dir / "runs" / f"{env.task_id}_{self.session.experiment}"
        return env.results_dir / self.session.experiment

    def settings(self) -> dict:
        """Everything the steps chose, as train.py options."""
        return {**self.session.settings(), "output": str(self.output_dir()), "reporter": "none"}

    def _start(self):
        if self.run is not None and self.run.running:
            return self.error("Training is already running: stop it first.")
        settings = self.settings()
        argv = settings_to_argv(settings)
        try:
            config = parse_config(argv)
        except ArgsError as e:
            raise ValueError(str(e)) from None
        model_classes = data.build_model_classes(self.session.project.meta, config.classes)
        ui_state = {**ui_state_from_config(config, model_classes), "settings": settings,
                    "widgets": json.loads(json.dumps(dict(StateJson()), default=str))}
        if self.session.launch.distributed:
            ui_state["gpusId"] = list(self.session.launch.torchrun_gpus)
        self._clear()
        self._show_command(argv, self.session.launch)
        run = self.run = Run(argv, self.session.launch)
        run.worker = threading.Thread(target=self._train, args=(run, ui_state), name="unet-train", daemon=True)
        run.follower = threading.Thread(target=self._follow, args=(run,), name="unet-follow", daemon=True)
        self.train.disable()  # before the threads: a run that fails at once re-enables it
        self.phase.set("running", status="info")
        self.info("Training started.")
        run.worker.start()
        run.follower.start()

    def _stop(self):
        if self.run is None or not self.run.worker.is_alive():
            return self.error("Nothing to stop: training is not running.")
        self.run.reporter.request_stop()
        self.phase.set("stopping", status="warning")
        self.info("Stopping: the current epoch ends early and the last checkpoint is saved.")

    def _train(self, run: Run, ui_state: dict):
        try:
            run.summary = start_training(run.argv, run.launch, run.reporter, ui_state)
        except ENGINE_ERRORS as e:
            run.error = str(e)
        except Exception as e:
            logger.error("training failed:\n%s", traceback.format_exc())
            run.error = f"Training failed: {type(e).__name__}: {e}"

    # ---- following the run
    def _follow(self, run: Run):
        view = RunView(self, run)
        try:
            while True:
                alive = run.worker.is_alive()
                for event in run.reporter.drain():
                    replay(event, view)
                if not alive:
                    break
                run.worker.join(POLL_SECONDS)
            self._finish(run)
        except Exception as e:
            logger.error("dashboard update failed:\n%s", traceback.format_exc())
            self.phase.set("failed", status="error")
            self.error(f"Unexpected error: {type(e).__name__}: {e}")
        finally:
            self._close_bars(run)
            self.train.enable()

    @staticmethod
    def _close_bars(run: Run) -> None:
        """Closed, never left to the garbage collector (see train_app.progress)."""
        for bar in (run.iter_bar, run.epoch_bar):
            if bar is not None:
                bar.close()
        run.iter_bar = run.epoch_bar = None

    def show_previews(self, epoch):
        run = self.run
        if run is None or epoch not in run.previews:
            return
        self.gallery.clean_up()
        for column, split in enumerate(("train", "val")):
            for name, url in run.previews[epoch].get(split, []):
                self.gallery.append(url, title=f"{split}: {name}", column_index=column)

    def _finish(self, run: Run):
        self._close_bars(run)
        if run.error or run.summary is None:
            self.phase.set("failed", status="error")
            return self.error(run.error or "Training ended without a summary.")
        summary = run.summary
        output = Path(summary["output_dir"])
        best = summary.get("best")
        if best:
            self.results.set(f"Best {best['metric']} {best['value']:.4f} at epoch {best['epoch']}: "
                             f"{Path(best['checkpoint']).name}", status="text")
        env = self.session.env
        problems = []
        if env.platform:
            platform_outputs.write_model_meta(output)
            self.phase.set("uploading", status="info")
            try:
                run.location = self._upload(output)
            except platform_io.UploadError as e:  # retries exhausted: the message says where and how to finish
                logger.error("%s", e)
                self.error(html.escape(str(e)).replace("\n", "<br>"))
                return self.phase.set("upload failed", status="error")  # last: what a watcher waits for
            except Exception as e:  # the run itself is fine: say where it is
                logger.error("upload failed:\n%s", traceback.format_exc())
                self.phase.set("upload failed", status="error")
                self._show_evaluation(summary, str(output))
                return self.error(f"Uploading the artifacts failed ({type(e).__name__}: {e}); "
                                  f"they are kept in {output} on the agent.")
            problems = self._after_upload(run, output)
        else:
            run.location = str(output)
        self.location.set(f"Artifacts: {run.location}", status="success")
        self.location.show()
        self._show_evaluation(summary, run.location)
        self.wizard.complete(self, f"Training {summary['status']} after epoch {summary['last_epoch']} of "
                                   f"{summary['epochs']}.")
        if problems:  # shown on the card: the app stays up for the user to read it
            self.error(" ".join(problems))
            return self.phase.set(summary["status"], status="warning")
        self.phase.set(summary["status"], status="success")
        if env.platform and self.session.after_training.stop_app and self.stop_app is not None:
            logger.info("training finished and uploaded: the app stops")
            self.stop_app()

    def _after_upload(self, run: Run, output: Path) -> list[str]:
        """The platform's records of an uploaded run, as the original app made them: the Model Benchmark, the
        experiment, the workflow. What fails is returned for the card; the uploaded run stays as it is."""
        env, after, problems = self.session.env, self.session.after_training, []
        try:
            project = env.api.project.get_info_by_id(env.project_id)
        except Exception as e:  # nothing of the platform's records can be made without it
            return [f"The run is uploaded, but the project could not be read for its records: {type(e).__name__}: {e}"]
        benchmark = None
        if after.benchmark:
            self.phase.set("benchmarking", status="info")
            try:
                benchmark = self._benchmark(output, after.benchmark_speed_test)
            except model_benchmark.BenchmarkError as e:
                logger.error("model benchmark failed: %s", e)
                problems.append(f"The Model Benchmark failed: {str(e).removeprefix('model benchmark: ')}")
        best = Path(RunFolder(output).chosen_checkpoint()).relative_to(output).as_posix()
        try:
            info = platform_outputs.experiment_info(env, output, run.location, project, self.session.settings()["model"],
                                                    benchmark, self.session.weights_source)
            platform_outputs.register_experiment(env, output, run.location, info, project)
        except Exception as e:  # the run is uploaded: say what is missing
            logger.error("registering the experiment failed:\n%s", traceback.format_exc())
            problems.append(f"The run is uploaded but not in the Experiments table: {type(e).__name__}: {e}")
        try:
            platform_outputs.record_workflow(env, run.location, best, self.session.weights_source,
                                             benchmark.report_file if benchmark else None)
        except Exception as e:  # a record of lineage only: the run and its outputs are complete
            logger.warning("workflow nodes not recorded: %s: %s", type(e).__name__, e)
        return problems

    def _benchmark(self, output: Path, speed_test: bool):
        val = set(data.read_item_list(str(RunFolder(output).split_set("val"))))
        items = [item for item in self.session.items if (item.dataset_name, item.item_name) in val]
        classes = [c.name for c in RunFolder(output).read_model_classes()]
        # the SDK's steps count with the card's progress bar (each one opened and closed in a with block)
        result = model_benchmark.run_model_benchmark(self.session.env, output, items, classes, speed_test, self.upload)
        self.benchmark.set(f"Model Benchmark: <a href=\"{html.escape(result.report_link)}\" target=\"_blank\">"
                           f"the evaluation report</a>", status="success")
        self.benchmark.show()
        return result

    def _show_evaluation(self, summary: dict, run_location: str):
        status, metrics, text = describe_evaluation(summary, run_location)
        lines = [f"{html.escape(label)}: <b>{value}</b>" for label, value in metrics]
        title = "<b>Evaluation on the validation set</b>" if metrics else ""
        self.evaluation.set("<br>".join(filter(None, [title, *lines, html.escape(text)])),
                            status="text" if status == "success" else status)
        self.evaluation.show()

    def _upload(self, output: Path) -> str:
        env = self.session.env
        RunFolder(output).open_app_link.write_text(f"{env.api.server_address}/apps/sessions/{env.task_id}\n")
        with counting(self.upload, message="Uploading artifacts", unit="B", unit_scale=True) as progress:
            return platform_io.upload_artifacts(env, output, f"/unet/{env.task_id}_{self.session.experiment}/", progress)

    # ---- restart
    def on_unlock(self):
        self._clear()
        self._show_command(settings_to_argv(self.settings()), self.session.launch)
        self.train.enable()

    def _show_command(self, argv, launch: Launch):
        """The same run from a terminal (and what the tests parse back)."""
        if launch.distributed:
            gpus = torchrun_command(argv, list(launch.torchrun_gpus))[1]["CUDA_VISIBLE_DEVICES"]
            prefix = f"CUDA_VISIBLE_DEVICES={gpus} torchrun --standalone --nproc-per-node {len(launch.torchrun_gpus)}"
        else:
            prefix = "python"
        self.command.set(f"{prefix} custom_net/train.py {shlex.join(argv)}", status="text")

    def reset(self):
        self._clear()
        self.command.set("", status="text")
        self.run = None

    def _clear(self):
        for plot, series in ((self.lr_plot, ["lr"]), (self.loss_plot, ["train", "val"]),
                             (self.metrics_plot, ["IoU", "Dice"])):
            plot.clean_up()
            for name in series:  # add_to_series needs the series to exist
                plot.add_series(name, [], [])
        self.gallery.clean_up()
        self.preview_epoch.set([Select.Item(0, "no previews yet")])
        self.log.set("", status="text")
        self.results.set("", status="text")
        self.evaluation.hide()
        self.phase.set("Not started", status="text")
        self.location.hide()
        self.benchmark.hide()

    @property
    def busy(self) -> bool:
        return self.run is not None and self.run.running

    def shutdown(self, timeout: float = 120) -> None:
        """The app is stopping: end a running training cleanly, so its last checkpoint is saved."""
        if self.run is not None and self.run.worker.is_alive():
            self.run.reporter.request_stop()
            self.run.worker.join(timeout)
