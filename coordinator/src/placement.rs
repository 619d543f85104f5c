//! Strict platform placement: a stage runs natively on a worker of its platform when one
//! exists, under emulation only when the build allows it, and a stage no worker can run fails
//! the build before anything starts, naming the platform and the workers. Never a silent
//! wrong-architecture build.
//!
//! A pure function of the plan and the workers, tested without the network.

use strata_shared::dag::{Placement, Plan};
pub use strata_shared::platform::Emulation;
use strata_shared::platform::{Capabilities, Platform};

/// A worker as placement sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkerInfo {
    pub name: String,
    pub capabilities: Capabilities,
}

/// A stage that cannot be placed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct PlacementError {
    pub platform: Platform,
    /// Why, in a few words (`no worker runs windows/amd64`).
    pub reason: String,
    /// Why, naming the workers and what they run.
    pub message: String,
}

/// Where a stage of `platform` runs.
pub fn place(
    platform: &Platform,
    workers: &[WorkerInfo],
    emulation: Emulation,
) -> Result<Placement, PlacementError> {
    if let Some(w) = workers.iter().find(|w| w.capabilities.native_for(platform)) {
        return Ok(Placement::On {
            worker: w.name.clone(),
            emulated: false,
        });
    }
    let emulator = workers
        .iter()
        .find(|w| w.capabilities.emulated_for(platform));
    match (emulator, emulation) {
        (Some(w), Emulation::Allow) => Ok(Placement::On {
            worker: w.name.clone(),
            emulated: true,
        }),
        (Some(_), Emulation::Deny) => {
            let reason = format!(
                "no worker runs {platform} natively and emulation is denied (--emulation=deny)"
            );
            Err(PlacementError {
                platform: platform.clone(),
                message: format!("{reason}; workers: {}", list(workers)),
                reason,
            })
        }
        (None, _) => Err(PlacementError {
            platform: platform.clone(),
            reason: format!("no worker runs {platform}"),
            message: format!("no worker can build {platform}; workers: {}", list(workers)),
        }),
    }
}

/// Where a stage of `platform` runs: [`place`] when it runs a command (`executes`); on any
/// worker otherwise (copying files and pulling images work for any platform), a worker of its
/// platform first.
pub fn place_stage(
    platform: &Platform,
    executes: bool,
    workers: &[WorkerInfo],
    emulation: Emulation,
) -> Result<Placement, PlacementError> {
    if executes {
        return place(platform, workers, emulation);
    }
    let worker = workers
        .iter()
        .find(|w| w.capabilities.native_for(platform))
        .or_else(|| workers.first());
    match worker {
        Some(w) => Ok(Placement::Anywhere {
            worker: w.name.clone(),
        }),
        None => Err(PlacementError {
            platform: platform.clone(),
            reason: "no worker is registered".into(),
            message: "no worker is registered".into(),
        }),
    }
}

/// Places every stage instance of a plan, recording where each runs, or why it cannot, in
/// the plan; returns the instances that cannot be placed. A plan is a question: it is
/// answered for every stage, placeable or not.
pub fn place_all(
    plan: &mut Plan,
    workers: &[WorkerInfo],
    emulation: Emulation,
) -> Vec<PlacementError> {
    let mut errors = Vec::new();
    plan.placements = plan
        .instances
        .iter()
        .map(
            |i| match place_stage(&i.platform, i.executes, workers, emulation) {
                Ok(p) => p,
                Err(e) => {
                    let reason = e.reason.clone();
                    errors.push(e);
                    Placement::Unplaceable { reason }
                }
            },
        )
        .collect();
    errors
}

/// Places every stage instance of a plan for a build: the first instance that cannot be
/// placed is the error.
pub fn place_plan(
    plan: &mut Plan,
    workers: &[WorkerInfo],
    emulation: Emulation,
) -> Result<(), PlacementError> {
    match place_all(plan, workers, emulation).into_iter().next() {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

fn list(workers: &[WorkerInfo]) -> String {
    if workers.is_empty() {
        return "none".into();
    }
    workers
        .iter()
        .map(|w| format!("{} ({})", w.name, w.capabilities))
        .collect::<Vec<_>>()
        .join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;
    use strata_shared::dockerfile::Dockerfile;
    use strata_shared::dockerfile::stages::BuildOptions;

    fn p(s: &str) -> Platform {
        s.parse().unwrap()
    }

    fn workers() -> Vec<WorkerInfo> {
        vec![
            WorkerInfo {
                name: "x86-1".into(),
                capabilities: Capabilities {
                    native: vec![p("linux/amd64/v3")],
                    emulated: vec![p("linux/arm64")],
                },
            },
            WorkerInfo {
                name: "arm-1".into(),
                capabilities: Capabilities {
                    native: vec![p("linux/arm64")],
                    emulated: vec![],
                },
            },
        ]
    }

    #[test]
    fn native_first_even_when_another_worker_emulates_it() {
        let at = place(&p("linux/arm64/v8"), &workers(), Emulation::Allow).unwrap();
        assert_eq!(
            at,
            Placement::On {
                worker: "arm-1".into(),
                emulated: false
            }
        );
        let at = place(&p("linux/amd64/v2"), &workers(), Emulation::Deny).unwrap();
        assert_eq!(
            at,
            Placement::On {
                worker: "x86-1".into(),
                emulated: false
            }
        );
    }

    #[test]
    fn emulation_only_when_allowed() {
        let only_x86 = &workers()[..1];
        let at = place(&p("linux/arm64"), only_x86, Emulation::Allow).unwrap();
        assert_eq!(at.emulated(), Some(true));
        let err = place(&p("linux/arm64"), only_x86, Emulation::Deny).unwrap_err();
        assert_eq!(
            err.message,
            "no worker runs linux/arm64 natively and emulation is denied (--emulation=deny); \
             workers: x86-1 (native linux/amd64/v3; emulated linux/arm64)"
        );
    }

    #[test]
    fn a_platform_nobody_serves_is_an_error_naming_the_workers() {
        let err = place(&p("linux/riscv64"), &workers(), Emulation::Allow).unwrap_err();
        assert!(
            err.message
                .starts_with("no worker can build linux/riscv64; workers: x86-1"),
            "{}",
            err.message
        );
        assert!(
            err.message
                .contains("arm-1 (native linux/arm64; emulated none)"),
            "{}",
            err.message
        );
        let err = place(&p("linux/amd64/v4"), &workers(), Emulation::Allow).unwrap_err();
        assert!(
            err.message.contains("linux/amd64/v4"),
            "a v3 machine does not run v4"
        );
    }

    #[test]
    fn plans_record_where_each_stage_runs() {
        let df = Dockerfile::parse(
            "FROM --platform=$BUILDPLATFORM scratch AS tools\nRUN make\nFROM scratch\nCOPY --from=tools / /\nRUN check\n",
        )
        .unwrap();
        let mut plan = strata_shared::dag::plan(
            &df,
            &BuildOptions::default(),
            &p("linux/amd64"),
            &[p("linux/amd64"), p("linux/arm64")],
        )
        .unwrap();
        place_plan(&mut plan, &workers()[..1], Emulation::Allow).unwrap();
        let emulated: Vec<(String, bool)> = plan
            .instances
            .iter()
            .map(|i| {
                (
                    format!("{} {}", i.name, i.platform),
                    plan.placements[i.id].emulated().unwrap_or_default(),
                )
            })
            .collect();
        assert_eq!(
            emulated,
            [
                ("tools linux/amd64".to_string(), false),
                ("stage-1 linux/amd64".to_string(), false),
                ("stage-1 linux/arm64".to_string(), true)
            ]
        );
        assert!(plan.to_text().contains("on x86-1 (emulated)"));
    }

    #[test]
    fn a_plan_marks_what_cannot_be_placed_and_keeps_the_rest() {
        let df = Dockerfile::parse(
            "FROM --platform=$BUILDPLATFORM scratch AS tools\nRUN make\nFROM scratch\nCOPY --from=tools / /\nRUN check\n",
        )
        .unwrap();
        let mut plan = strata_shared::dag::plan(
            &df,
            &BuildOptions::default(),
            &p("linux/amd64"),
            &[p("windows/amd64")],
        )
        .unwrap();
        let errors = place_all(&mut plan, &workers(), Emulation::Allow);
        assert_eq!(errors.len(), 1);
        let text = plan.to_text();
        assert!(text.contains("tools [0] linux/amd64"), "{text}");
        assert!(text.contains("on x86-1 (native)"), "{text}");
        assert!(
            text.contains("unplaceable: no worker runs windows/amd64"),
            "{text}"
        );
        assert!(
            plan.to_json()
                .contains("\"unplaceable\": \"no worker runs windows/amd64\""),
            "{}",
            plan.to_json()
        );
        assert!(place_plan(&mut plan, &workers(), Emulation::Allow).is_err());
    }
}
