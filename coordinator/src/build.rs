//! Driving one build: plan the Dockerfile into stage instances, hand each instance to a
//! [`Runner`] as a [`StageJob`] once every instance it uses is done, and collect the outputs of
//! the target instances.
//!
//! Independent instances run at the same time; instances the target does not need are pruned
//! by the plan and never run. The first failing job fails the build and stops the others.

use std::collections::BTreeMap;
use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;

use strata_shared::dag::{self, Plan};
use strata_shared::dockerfile::Dockerfile;
use strata_shared::dockerfile::stages::BuildOptions;
use strata_shared::job::{BuildError, Compression, JobContext, StageJob, StageOutput};
use strata_shared::platform::Platform;
use strata_shared::progress::Progress;
use tokio::task::JoinSet;

use crate::placement::{Emulation, WorkerInfo, place_plan};

/// Runs stage jobs: the local engine in embedded mode, a remote worker in a cluster.
pub trait Runner: Send + Sync + 'static {
    fn run(
        &self,
        job: StageJob,
        progress: Progress,
    ) -> impl Future<Output = Result<StageOutput, BuildError>> + Send;
}

/// What to build.
#[derive(Debug, Clone)]
pub struct BuildRequest {
    pub dockerfile: String,
    pub context: PathBuf,
    pub options: BuildOptions,
    /// Target platforms, at least one.
    pub platforms: Vec<Platform>,
    /// The platform the builder runs on (`BUILDPLATFORM`).
    pub build_platform: Platform,
    pub no_cache: bool,
    pub secrets: BTreeMap<String, PathBuf>,
    pub allow_host_network: bool,
    pub compression: Compression,
    /// The workers stages may be placed on.
    pub workers: Vec<WorkerInfo>,
    pub emulation: Emulation,
}

/// A finished build: the plan it ran and the image of each target platform.
#[derive(Debug, Clone)]
pub struct BuildResult {
    pub plan: Plan,
    pub images: Vec<(Platform, StageOutput)>,
}

/// Plans a request and places every stage on a worker of its platform.
pub fn plan(req: &BuildRequest) -> Result<(Dockerfile, Plan), BuildError> {
    let df = Dockerfile::parse(&req.dockerfile)?;
    if req.platforms.is_empty() {
        return Err(BuildError::Other("no target platform given".into()));
    }
    let mut plan = dag::plan(&df, &req.options, &req.build_platform, &req.platforms)?;
    place_plan(&mut plan, &req.workers, req.emulation).map_err(|e| {
        // Name a stage of the platform that cannot be placed, with its FROM line.
        let stage = plan.instances.iter().find(|i| i.platform == e.platform);
        match stage.and_then(|i| df.parsed.stages.get(i.index)) {
            Some(st) => BuildError::at(st.range, e.message),
            None => BuildError::Other(e.message),
        }
    })?;
    Ok((df, plan))
}

/// Runs a build to the end, or to its first failure.
pub async fn run<R: Runner>(
    req: &BuildRequest,
    runner: Arc<R>,
    progress: &Progress,
) -> Result<BuildResult, BuildError> {
    let (df, plan) = plan(req)?;
    if let Some(text) = df.frontend_note() {
        progress.send(strata_shared::progress::Event::Note { text });
    }
    let n = plan.instances.len();
    let mut outputs: Vec<Option<StageOutput>> = vec![None; n];
    let mut started = vec![false; n];
    let mut running: JoinSet<(usize, Result<StageOutput, BuildError>)> = JoinSet::new();
    let mut done = 0;
    while done < n {
        for inst in &plan.instances {
            if started[inst.id] || inst.depends_on.iter().any(|d| outputs[*d].is_none()) {
                continue;
            }
            started[inst.id] = true;
            let inputs = inst
                .depends_on
                .iter()
                .filter_map(|d| {
                    let out = outputs[*d].clone()?;
                    Some((plan.instances[*d].index, out))
                })
                .collect();
            let job = StageJob {
                id: inst.id,
                dockerfile: req.dockerfile.clone(),
                options: req.options.clone(),
                build_platform: req.build_platform.clone(),
                target_platform: inst.targets[0].clone(),
                stage: inst.index,
                inputs,
                context: JobContext::Local(req.context.to_string_lossy().into_owned()),
                show_platform: req.platforms.len() > 1,
                no_cache: req.no_cache,
                secrets: req
                    .secrets
                    .iter()
                    .map(|(id, path)| (id.clone(), path.to_string_lossy().into_owned()))
                    .collect(),
                allow_host_network: req.allow_host_network,
                compression: req.compression,
            };
            let runner = runner.clone();
            let progress = progress.clone();
            let id = inst.id;
            running.spawn(async move { (id, runner.run(job, progress).await) });
        }
        let Some(joined) = running.join_next().await else {
            return Err(BuildError::Other(
                "the build cannot progress: some stages wait on stages that never run".into(),
            ));
        };
        let (id, result) =
            joined.map_err(|e| BuildError::Other(format!("a stage job panicked: {e}")))?;
        match result {
            Ok(out) => {
                outputs[id] = Some(out);
                done += 1;
            }
            Err(e) => {
                running.abort_all();
                while running.join_next().await.is_some() {}
                return Err(e);
            }
        }
    }
    let mut images = Vec::new();
    for (platform, id) in &plan.targets {
        let out = outputs[*id]
            .clone()
            .ok_or_else(|| BuildError::Other(format!("the image for {platform} was not built")))?;
        images.push((platform.clone(), out));
    }
    Ok(BuildResult { plan, images })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;
    use std::time::Duration;

    use strata_shared::oci::ImageConfig;

    /// Records which stages ran, how many at once, and fails one stage on request.
    #[derive(Default)]
    struct Recorder {
        ran: Mutex<Vec<usize>>,
        active: Mutex<(usize, usize)>,
        fail: Option<usize>,
    }

    impl Runner for Recorder {
        async fn run(&self, job: StageJob, _progress: Progress) -> Result<StageOutput, BuildError> {
            {
                let mut a = self.active.lock().unwrap();
                a.0 += 1;
                a.1 = a.1.max(a.0);
            }
            tokio::time::sleep(Duration::from_millis(30)).await;
            self.active.lock().unwrap().0 -= 1;
            self.ran.lock().unwrap().push(job.stage);
            if self.fail == Some(job.stage) {
                return Err(BuildError::Other(format!("stage {} failed", job.stage)));
            }
            let mut inputs: Vec<usize> = job.inputs.keys().copied().collect();
            inputs.sort_unstable();
            Ok(StageOutput {
                config: ImageConfig::empty(&job.target_platform),
                layers: Vec::new(),
                key: format!("{}:{inputs:?}", job.stage),
                env: Vec::new(),
                declared: Vec::new(),
            })
        }
    }

    fn request(dockerfile: &str) -> BuildRequest {
        let p: Platform = "linux/amd64".parse().unwrap();
        BuildRequest {
            dockerfile: dockerfile.into(),
            context: PathBuf::from("."),
            options: BuildOptions::default(),
            platforms: vec![p.clone()],
            build_platform: p.clone(),
            no_cache: false,
            secrets: BTreeMap::new(),
            allow_host_network: false,
            compression: Compression::Gzip,
            workers: vec![WorkerInfo {
                name: "local".into(),
                capabilities: strata_shared::platform::Capabilities {
                    native: vec![p.clone()],
                    emulated: Vec::new(),
                },
            }],
            emulation: Emulation::Allow,
        }
    }

    const DIAMOND: &str = "FROM scratch AS a\nFROM scratch AS b\nFROM scratch AS unused\n\
                           FROM scratch AS c\nCOPY --from=a / /\nCOPY --from=b / /\n";

    #[tokio::test]
    async fn independent_stages_overlap_and_pruned_ones_never_run() {
        let rec = Arc::new(Recorder::default());
        let res = run(&request(DIAMOND), rec.clone(), &Progress::discard())
            .await
            .unwrap();
        let mut ran = rec.ran.lock().unwrap().clone();
        assert_eq!(ran.pop(), Some(3), "the target runs last");
        ran.sort_unstable();
        assert_eq!(ran, vec![0, 1]);
        assert_eq!(
            rec.active.lock().unwrap().1,
            2,
            "a and b ran at the same time"
        );
        assert_eq!(res.images.len(), 1);
        assert_eq!(
            res.images[0].1.key, "3:[0, 1]",
            "the target got both inputs"
        );
    }

    #[tokio::test]
    async fn a_failing_stage_fails_the_build_and_dependents_never_start() {
        let rec = Arc::new(Recorder {
            fail: Some(0),
            ..Default::default()
        });
        let err = run(&request(DIAMOND), rec.clone(), &Progress::discard())
            .await
            .unwrap_err();
        assert_eq!(err.to_string(), "stage 0 failed");
        assert!(!rec.ran.lock().unwrap().contains(&3));
    }
}
