//! The build graph: the stages a build runs, once per requested platform, as a petgraph DAG.
//!
//! [`plan`] resolves the Dockerfile for each target platform, keeps only the stages the
//! target needs (unused stages are never scheduled), and merges the per-platform graphs: a
//! stage instance is identified by everything that can change what it builds (the stage, the
//! platform it runs for, its base, the values of the arguments it declares and the instances
//! it depends on). A `FROM --platform=$BUILDPLATFORM` stage that declares no `TARGET*`
//! argument therefore comes out identical for every target and is built once for all of them,
//! the cross-compilation pattern; a stage that declares `ARG TARGETARCH` is built per target.
//!
//! Each instance is one job for the scheduler. [`Plan::critical_path`] is the longest chain
//! of dependent instances, weighted by their step counts.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use petgraph::graph::{DiGraph, NodeIndex};
use serde::Serialize;

use crate::dockerfile::stages::{BuildOptions, Source, resolve};
use crate::dockerfile::{Dockerfile, FrontendError};
use crate::platform::Platform;

/// One stage built for one platform: one job.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct StageInstance {
    /// Position in [`Plan::instances`]; dependencies always come first.
    pub id: usize,
    /// The stage's index in the Dockerfile.
    pub index: usize,
    /// `AS` name or `stage-N`.
    pub name: String,
    /// The platform the stage's steps run for.
    pub platform: Platform,
    /// The requested target platforms this instance serves.
    pub targets: Vec<Platform>,
    /// The image, `scratch`, or the name of the stage it starts from.
    pub base: String,
    /// Ids of the instances it needs, its base first.
    pub depends_on: Vec<usize>,
    /// Steps: the base image pull, and each ADD, COPY, RUN and WORKDIR.
    pub steps: usize,
    /// Whether it runs a command: only then does it need a worker of its platform.
    pub executes: bool,
}

/// Where an instance runs: the worker, and whether its platform is emulated there; or why no
/// worker can run it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub enum Placement {
    On {
        worker: String,
        emulated: bool,
    },
    /// It runs no command: any worker builds it, whatever its platform.
    Anywhere {
        worker: String,
    },
    Unplaceable {
        reason: String,
    },
}

impl Placement {
    /// The worker it runs on, when placed.
    pub fn worker(&self) -> Option<&str> {
        match self {
            Placement::On { worker, .. } | Placement::Anywhere { worker } => Some(worker),
            Placement::Unplaceable { .. } => None,
        }
    }

    /// Whether it runs under emulation, when placed.
    pub fn emulated(&self) -> Option<bool> {
        match self {
            Placement::On { emulated, .. } => Some(*emulated),
            Placement::Anywhere { .. } => Some(false),
            Placement::Unplaceable { .. } => None,
        }
    }

    /// Why it cannot be placed.
    pub fn unplaceable(&self) -> Option<&str> {
        match self {
            Placement::On { .. } | Placement::Anywhere { .. } => None,
            Placement::Unplaceable { reason } => Some(reason),
        }
    }
}

/// The stage instances of a build and the graph between them.
#[derive(Debug, Clone)]
pub struct Plan {
    pub instances: Vec<StageInstance>,
    /// Where each instance runs, once placed (same order as `instances`).
    pub placements: Vec<Placement>,
    /// For each requested platform, the id of the instance that produces its image.
    pub targets: Vec<(Platform, usize)>,
    /// Edges from an instance to the instances that depend on it.
    pub graph: DiGraph<usize, ()>,
    nodes: Vec<NodeIndex>,
}

/// Resolves and prunes a Dockerfile into the stage instances a build runs.
pub fn plan(
    df: &Dockerfile,
    opts: &BuildOptions,
    build_platform: &Platform,
    platforms: &[Platform],
) -> Result<Plan, FrontendError> {
    let mut instances: Vec<StageInstance> = Vec::new();
    let mut by_key: BTreeMap<String, usize> = BTreeMap::new();
    let mut targets = Vec::new();
    let mut graph = DiGraph::new();
    let mut nodes = Vec::new();

    for target_platform in platforms {
        let res = resolve(df, opts, build_platform, target_platform)?;
        let reachable = res.reachable();
        // Stage index -> instance id, for this platform. Dependencies have lower indices.
        let mut local: BTreeMap<usize, usize> = BTreeMap::new();
        for &i in &reachable {
            let st = &res.stages[i];
            let mut deps = Vec::new();
            let mut dep_keys = Vec::new();
            for source in st.dependencies() {
                match source {
                    Source::Stage(j) => {
                        let id = *local.get(j).ok_or_else(|| {
                            FrontendError::at(
                                st.range,
                                "stage depends on a stage that is not built before it",
                            )
                        })?;
                        if !deps.contains(&id) {
                            deps.push(id);
                        }
                        dep_keys.push(format!("#{id}"));
                    }
                    Source::Image(r) => dep_keys.push(r.to_string()),
                    Source::Scratch => dep_keys.push("scratch".into()),
                }
            }
            let key = format!(
                "{i}\u{0}{}\u{0}{:?}\u{0}{}",
                st.platform,
                st.args,
                dep_keys.join("\u{1}")
            );
            let id = match by_key.get(&key) {
                Some(&id) => {
                    instances[id].targets.push(target_platform.clone());
                    id
                }
                None => {
                    let id = instances.len();
                    let base = match &st.base {
                        Source::Stage(j) => res.stages[*j].display_name(),
                        Source::Image(r) => r.to_string(),
                        Source::Scratch => "scratch".into(),
                    };
                    let node = graph.add_node(id);
                    for &d in &deps {
                        graph.add_edge(nodes[d], node, ());
                    }
                    nodes.push(node);
                    instances.push(StageInstance {
                        id,
                        index: i,
                        name: st.display_name(),
                        platform: st.platform.clone(),
                        targets: vec![target_platform.clone()],
                        base,
                        depends_on: deps,
                        steps: st.steps,
                        executes: st.executes,
                    });
                    by_key.insert(key, id);
                    id
                }
            };
            local.insert(i, id);
        }
        let target_id = *local
            .get(&res.target)
            .ok_or_else(|| FrontendError::new("the target stage was pruned"))?;
        targets.push((target_platform.clone(), target_id));
    }
    Ok(Plan {
        instances,
        placements: Vec::new(),
        targets,
        graph,
        nodes,
    })
}

impl Plan {
    /// The longest chain of dependent instances by total steps, and that total.
    pub fn critical_path(&self) -> (Vec<usize>, usize) {
        // Instances are in topological order: dependencies have lower ids.
        let mut best: Vec<(usize, Option<usize>)> = Vec::with_capacity(self.instances.len());
        for inst in &self.instances {
            let prev = inst
                .depends_on
                .iter()
                .map(|&d| (best[d].0, d))
                .max_by_key(|&(len, _)| len);
            let (len, from) = prev.map_or((0, None), |(l, d)| (l, Some(d)));
            best.push((len + inst.steps.max(1), from));
        }
        let Some((end, &(total, _))) = best.iter().enumerate().max_by_key(|(_, (l, _))| *l) else {
            return (Vec::new(), 0);
        };
        let mut path = vec![end];
        let mut cur = end;
        while let Some(p) = best[cur].1 {
            path.push(p);
            cur = p;
        }
        path.reverse();
        (path, total)
    }

    /// Total steps over all instances.
    pub fn total_steps(&self) -> usize {
        self.instances.iter().map(|i| i.steps.max(1)).sum()
    }

    /// The graph node of an instance.
    pub fn node(&self, id: usize) -> NodeIndex {
        self.nodes[id]
    }

    /// `{"stages": [...], "targets": [...], "critical_path": {...}}`, pretty-printed, fields in
    /// a fixed order.
    pub fn to_json(&self) -> String {
        #[derive(Serialize)]
        struct StageJson<'a> {
            id: usize,
            index: usize,
            name: &'a str,
            platform: String,
            targets: Vec<String>,
            base: &'a str,
            depends_on: Vec<usize>,
            depends_on_ids: &'a [usize],
            steps: usize,
            executes: bool,
            #[serde(skip_serializing_if = "Option::is_none")]
            worker: Option<&'a str>,
            #[serde(skip_serializing_if = "Option::is_none")]
            emulated: Option<bool>,
            #[serde(skip_serializing_if = "Option::is_none")]
            unplaceable: Option<&'a str>,
        }
        #[derive(Serialize)]
        struct TargetJson {
            platform: String,
            id: usize,
        }
        #[derive(Serialize)]
        struct PathJson {
            ids: Vec<usize>,
            steps: usize,
        }
        #[derive(Serialize)]
        struct PlanJson<'a> {
            stages: Vec<StageJson<'a>>,
            targets: Vec<TargetJson>,
            critical_path: PathJson,
        }
        let (ids, steps) = self.critical_path();
        let plan = PlanJson {
            stages: self
                .instances
                .iter()
                .map(|i| StageJson {
                    id: i.id,
                    index: i.index,
                    name: &i.name,
                    platform: i.platform.to_string(),
                    targets: i.targets.iter().map(Platform::to_string).collect(),
                    base: &i.base,
                    depends_on: i
                        .depends_on
                        .iter()
                        .map(|&d| self.instances[d].index)
                        .collect(),
                    depends_on_ids: &i.depends_on,
                    steps: i.steps,
                    executes: i.executes,
                    worker: self.placements.get(i.id).and_then(Placement::worker),
                    emulated: self.placements.get(i.id).and_then(Placement::emulated),
                    unplaceable: self.placements.get(i.id).and_then(Placement::unplaceable),
                })
                .collect(),
            targets: self
                .targets
                .iter()
                .map(|(p, id)| TargetJson {
                    platform: p.to_string(),
                    id: *id,
                })
                .collect(),
            critical_path: PathJson { ids, steps },
        };
        serde_json::to_string_pretty(&plan).unwrap_or_default()
    }

    /// A human-readable listing.
    pub fn to_text(&self) -> String {
        let mut out = String::new();
        for i in &self.instances {
            let deps: Vec<String> = i
                .depends_on
                .iter()
                .map(|&d| format!("#{d} {}", self.instances[d].name))
                .collect();
            let _ = write!(
                out,
                "#{} {} [{}] {}  FROM {}  steps={}",
                i.id, i.name, i.index, i.platform, i.base, i.steps
            );
            if !deps.is_empty() {
                let _ = write!(out, "  needs {}", deps.join(", "));
            }
            if i.targets.len() > 1 || i.targets.first() != Some(&i.platform) {
                let t: Vec<String> = i.targets.iter().map(Platform::to_string).collect();
                let _ = write!(out, "  for {}", t.join(", "));
            }
            match self.placements.get(i.id) {
                Some(Placement::On { worker, emulated }) => {
                    let how = if *emulated { "emulated" } else { "native" };
                    let _ = write!(out, "  on {worker} ({how})");
                }
                Some(Placement::Anywhere { worker }) => {
                    let _ = write!(out, "  on {worker} (runs no command: any platform)");
                }
                Some(Placement::Unplaceable { reason }) => {
                    let _ = write!(out, "  unplaceable: {reason}");
                }
                None => {}
            }
            out.push('\n');
        }
        for (p, id) in &self.targets {
            let _ = writeln!(out, "target {p}: #{id} {}", self.instances[*id].name);
        }
        let (path, total) = self.critical_path();
        let names: Vec<String> = path
            .iter()
            .map(|&i| format!("#{i} {}", self.instances[i].name))
            .collect();
        let _ = writeln!(
            out,
            "critical path: {} ({total} of {} steps)",
            names.join(" -> "),
            self.total_steps()
        );
        out
    }

    /// The graph in Graphviz's dot language.
    pub fn to_dot(&self) -> String {
        let mut out = String::from("digraph build {\n  rankdir=LR;\n  node [shape=box];\n");
        let (path, _) = self.critical_path();
        for i in &self.instances {
            let bold = if path.contains(&i.id) {
                ", penwidth=2"
            } else {
                ""
            };
            let _ = writeln!(
                out,
                "  s{} [label=\"{}\\n{}\\nFROM {}\"{bold}];",
                i.id,
                dot_escape(&i.name),
                i.platform,
                dot_escape(&i.base)
            );
        }
        for e in self.graph.edge_indices() {
            if let Some((a, b)) = self.graph.edge_endpoints(e) {
                let _ = writeln!(out, "  s{} -> s{};", self.graph[a], self.graph[b]);
            }
        }
        out.push_str("}\n");
        out
    }
}

fn dot_escape(s: &str) -> String {
    s.replace('\\', "\\\\").replace('"', "\\\"")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan_of(src: &str, target: Option<&str>, platforms: &[&str]) -> Plan {
        let df = Dockerfile::parse(src).unwrap();
        let opts = BuildOptions {
            target: target.map(str::to_string),
            ..Default::default()
        };
        let ps: Vec<Platform> = platforms.iter().map(|p| p.parse().unwrap()).collect();
        plan(&df, &opts, &"linux/amd64".parse().unwrap(), &ps).unwrap()
    }

    #[test]
    fn prunes_to_target() {
        let src = "FROM busybox AS a\nRUN a\nFROM busybox AS unused\nRUN b\nFROM busybox AS c\nCOPY --from=a /x /x\n";
        let p = plan_of(src, None, &["linux/amd64"]);
        let names: Vec<&str> = p.instances.iter().map(|i| i.name.as_str()).collect();
        assert_eq!(names, vec!["a", "c"]);
        let p = plan_of(src, Some("unused"), &["linux/amd64"]);
        assert_eq!(p.instances.len(), 1);
        assert_eq!(p.instances[0].name, "unused");
    }

    #[test]
    fn cross_compile_stage_is_shared() {
        let src = "FROM --platform=$BUILDPLATFORM busybox AS build\nRUN make\nFROM busybox\nCOPY --from=build /out /out\n";
        let p = plan_of(src, None, &["linux/amd64", "linux/arm64"]);
        assert_eq!(p.instances.len(), 3);
        assert_eq!(p.instances[0].name, "build");
        assert_eq!(p.instances[0].targets.len(), 2);
        assert_eq!(p.instances[0].platform.to_string(), "linux/amd64");
        assert_eq!(p.instances[1].depends_on, vec![0]);
        assert_eq!(p.instances[2].depends_on, vec![0]);
        assert_eq!(p.instances[2].platform.to_string(), "linux/arm64");
    }

    #[test]
    fn stage_using_target_args_is_per_platform() {
        let src = "FROM --platform=$BUILDPLATFORM busybox AS build\nARG TARGETARCH\nRUN make $TARGETARCH\nFROM busybox\nCOPY --from=build /out /out\n";
        let p = plan_of(src, None, &["linux/amd64", "linux/arm64"]);
        assert_eq!(p.instances.len(), 4);
        assert!(
            p.instances
                .iter()
                .filter(|i| i.name == "build")
                .all(|i| i.platform.to_string() == "linux/amd64")
        );
    }

    #[test]
    fn critical_path_is_longest_chain() {
        let src = "FROM busybox AS a\nRUN 1\nRUN 2\nRUN 3\nFROM busybox AS b\nRUN 1\nFROM a AS c\nCOPY --from=b / /\nRUN 4\n";
        let p = plan_of(src, None, &["linux/amd64"]);
        let (path, total) = p.critical_path();
        let names: Vec<&str> = path.iter().map(|&i| p.instances[i].name.as_str()).collect();
        assert_eq!(names, vec!["a", "c"]);
        assert_eq!(total, 4 + 2);
        assert!(p.to_dot().contains("s0 -> s2"));
    }
}
