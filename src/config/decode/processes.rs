//! `processes:`: supervised external programs (names, command, restart policy, stop behaviour).

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::Duration;

use super::node::{Node, NodeKind};
use super::reader::{Ctx, Fields, IntRange, index};
use super::sections::{KnownIds, backoff, to_u32};
use crate::config::{BackoffConfig, CrashLoopConfig, ProcessConfig, RestartPolicy, StopSignal};

const PROCESS_KEYS: &[&str] = &[
    "name",
    "command",
    "args",
    "cwd",
    "env",
    "restart",
    "success_exit_codes",
    "backoff",
    "crash_loop",
    "stop_signal",
    "stop_timeout",
    "instance",
];
const CRASH_LOOP_KEYS: &[&str] = &["max_starts", "window"];

const DEFAULT_BACKOFF: BackoffConfig = BackoffConfig {
    initial: Duration::from_secs(1),
    max: Duration::from_secs(60),
};
const DEFAULT_CRASH_LOOP: CrashLoopConfig = CrashLoopConfig {
    max_starts: 5,
    window: Duration::from_secs(120),
};
const DEFAULT_STOP_TIMEOUT: Duration = Duration::from_secs(10);

/// The `processes:` list; names unique, instances known.
pub(super) fn processes(
    ctx: &mut Ctx<'_>,
    node: Option<&Node>,
    instances: &KnownIds,
) -> Vec<ProcessConfig> {
    let path = "processes";
    let Some(items) = node.and_then(|node| ctx.seq(node, path)) else {
        return Vec::new();
    };
    let mut names: HashMap<String, u64> = HashMap::new();
    let mut processes = Vec::with_capacity(items.len());
    for (i, item) in items.iter().enumerate() {
        if let Some(process) = process(ctx, item, &index(path, i), &mut names, instances) {
            processes.push(process);
        }
    }
    processes
}

fn process(
    ctx: &mut Ctx<'_>,
    node: &Node,
    path: &str,
    names: &mut HashMap<String, u64>,
    instances: &KnownIds,
) -> Option<ProcessConfig> {
    let fields = ctx.map(node, path)?;
    fields.check_allowed(ctx, PROCESS_KEYS, "");
    let name = fields
        .required(ctx, "name")
        .and_then(|name_node| name(ctx, name_node, &fields.path_of("name"), names));
    let command = fields
        .required(ctx, "command")
        .and_then(|command| ctx.non_empty_string(command, &fields.path_of("command")));
    let args = match fields.get("args") {
        Some(node) => ctx.string_list(node, &fields.path_of("args")),
        None => Some(Vec::new()),
    };
    let cwd = match fields.get("cwd") {
        Some(node) => ctx
            .non_empty_string(node, &fields.path_of("cwd"))
            .map(|cwd| Some(PathBuf::from(cwd))),
        None => Some(None),
    };
    let env = match fields.get("env") {
        Some(node) => env(ctx, node, &fields.path_of("env")),
        None => Some(Vec::new()),
    };
    let restart = match fields.get("restart") {
        Some(node) => restart(ctx, node, &fields.path_of("restart")),
        None => Some(RestartPolicy::OnFailure),
    };
    let success_exit_codes = match fields.get("success_exit_codes") {
        Some(node) => exit_codes(ctx, node, &fields.path_of("success_exit_codes")),
        None => Some(vec![0]),
    };
    let backoff = backoff(ctx, &fields, DEFAULT_BACKOFF);
    let crash_loop = crash_loop(ctx, &fields);
    let stop_signal = match fields.get("stop_signal") {
        Some(node) => stop_signal(ctx, node, &fields.path_of("stop_signal")),
        None => Some(StopSignal::Term),
    };
    let stop_timeout = fields.duration_or(ctx, "stop_timeout", DEFAULT_STOP_TIMEOUT);
    let instance = match fields.get("instance") {
        Some(node) => instance(ctx, node, &fields.path_of("instance"), instances),
        None => Some(None),
    };
    Some(ProcessConfig {
        name: name?,
        command: command?,
        args: args?,
        cwd: cwd?,
        env: env?,
        restart: restart?,
        success_exit_codes: success_exit_codes?,
        backoff,
        crash_loop,
        stop_signal: stop_signal?,
        stop_timeout,
        instance: instance?,
    })
}

/// `[a-z0-9_-]{1,64}` (it becomes the `process` label), unique.
fn name(
    ctx: &mut Ctx<'_>,
    node: &Node,
    path: &str,
    names: &mut HashMap<String, u64>,
) -> Option<String> {
    let name = ctx.string(node, path)?;
    if let Some(first) = names.get(&name) {
        let message = format!("duplicate process name {name:?} (first defined at line {first})");
        ctx.error(node, path, message);
        return None;
    }
    names.insert(name.clone(), node.line);
    let valid = (1..=64).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'_' | b'-'));
    if !valid {
        let message =
            format!("invalid process name {name:?}: use 1 to 64 characters from a-z 0-9 _ -");
        ctx.error(node, path, message);
        return None;
    }
    Some(name)
}

/// A map of variable names to string values. Values are never quoted in messages: they often
/// hold credentials.
fn env(ctx: &mut Ctx<'_>, node: &Node, path: &str) -> Option<Vec<(String, String)>> {
    let fields: Fields<'_> = ctx.map(node, path)?;
    let mut vars = Vec::new();
    let mut ok = true;
    let entries: Vec<(String, &Node, &Node)> = fields
        .entries()
        .map(|(name, key, value)| (name.to_owned(), key, value))
        .collect();
    for (name, key, value) in entries {
        let var_path = fields.path_of(&name);
        if name.is_empty() || name.contains(['=', '\0']) {
            ctx.error(key, &var_path, "invalid variable name");
            ok = false;
            continue;
        }
        let value = match &value.kind {
            NodeKind::Null => {
                ctx.error(value, &var_path, "expected a string value, found null");
                None
            }
            _ => ctx.string(value, &var_path),
        };
        match value {
            Some(value) if value.contains('\0') => {
                ctx.error(key, &var_path, "the value must not contain a NUL byte");
                ok = false;
            }
            Some(value) => vars.push((name, value)),
            None => ok = false,
        }
    }
    ok.then_some(vars)
}

fn restart(ctx: &mut Ctx<'_>, node: &Node, path: &str) -> Option<RestartPolicy> {
    let text = ctx.string(node, path)?;
    match text.trim() {
        "never" => Some(RestartPolicy::Never),
        "on-failure" => Some(RestartPolicy::OnFailure),
        "always" => Some(RestartPolicy::Always),
        _ => {
            let message = format!("invalid restart {text:?}: expected never, on-failure or always");
            ctx.error(node, path, message);
            None
        }
    }
}

fn exit_codes(ctx: &mut Ctx<'_>, node: &Node, path: &str) -> Option<Vec<i32>> {
    let items = ctx.seq(node, path)?;
    let mut codes = Vec::with_capacity(items.len());
    let mut ok = true;
    for (i, item) in items.iter().enumerate() {
        let range = IntRange::between(i128::from(i32::MIN), i128::from(i32::MAX));
        match ctx.int_in(item, &index(path, i), range) {
            Some(code) => codes.push(i32::try_from(code).unwrap_or_default()),
            None => ok = false,
        }
    }
    ok.then_some(codes)
}

fn crash_loop(ctx: &mut Ctx<'_>, parent: &Fields<'_>) -> CrashLoopConfig {
    let path = parent.path_of("crash_loop");
    let Some(fields) = ctx.section(parent.get_raw("crash_loop"), &path, CRASH_LOOP_KEYS) else {
        return DEFAULT_CRASH_LOOP;
    };
    CrashLoopConfig {
        max_starts: to_u32(fields.int_or(
            ctx,
            "max_starts",
            IntRange::between(1, 10_000),
            i128::from(DEFAULT_CRASH_LOOP.max_starts),
        )),
        window: fields.duration_or(ctx, "window", DEFAULT_CRASH_LOOP.window),
    }
}

fn stop_signal(ctx: &mut Ctx<'_>, node: &Node, path: &str) -> Option<StopSignal> {
    let text = ctx.string(node, path)?;
    let signal = StopSignal::parse(&text);
    if signal.is_none() {
        let names: Vec<&str> = StopSignal::ALL.iter().map(|(_, name)| *name).collect();
        let message = format!(
            "invalid stop_signal {text:?}: expected one of {}",
            names.join(", ")
        );
        ctx.error(node, path, message);
    }
    signal
}

fn instance(
    ctx: &mut Ctx<'_>,
    node: &Node,
    path: &str,
    instances: &KnownIds,
) -> Option<Option<String>> {
    let id = ctx.string(node, path)?;
    if instances.contains_key(&id) {
        Some(Some(id))
    } else {
        ctx.error(node, path, format!("unknown instance id {id:?}"));
        None
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use crate::config::{RestartPolicy, StopSignal, decode};

    const HEAD: &str =
        "instances:\n  - {id: wx-a, base_url: http://a, api_key_env: K}\nprocesses:\n";

    fn env(name: &str) -> Option<String> {
        (name == "K").then(|| "key-0123456789".to_owned())
    }

    fn errors(processes: &str) -> Vec<String> {
        match decode(&format!("{HEAD}{processes}"), None, &env) {
            Ok(loaded) => panic!("accepted: {:?}", loaded.config.processes),
            Err(errors) => errors.errors.iter().map(ToString::to_string).collect(),
        }
    }

    #[test]
    fn defaults_and_every_key() {
        let text = format!(
            "{HEAD}  - {{name: a, command: sleep}}\n  - name: b_2-x\n    command: ./run.sh\n    \
             args: [1, '--x']\n    cwd: /srv\n    env: {{A: '1', B: 2}}\n    restart: always\n    \
             success_exit_codes: [0, -15]\n    backoff: {{initial: 10ms, max: 1s}}\n    \
             crash_loop: {{max_starts: 2, window: 5s}}\n    stop_signal: SIGint\n    \
             stop_timeout: 1s\n    instance: wx-a\n"
        );
        let loaded = decode(&text, None, &env).unwrap_or_else(|errors| panic!("{errors}"));
        let [a, b] = loaded.config.processes.as_slice() else {
            panic!("two processes expected");
        };
        assert_eq!(a.restart, RestartPolicy::OnFailure);
        assert_eq!(a.success_exit_codes, [0]);
        assert_eq!(a.backoff.initial, Duration::from_secs(1));
        assert_eq!(a.crash_loop.max_starts, 5);
        assert_eq!(a.crash_loop.window, Duration::from_secs(120));
        assert_eq!(a.stop_signal, StopSignal::Term);
        assert_eq!(a.stop_timeout, Duration::from_secs(10));
        assert_eq!((a.cwd.as_ref(), a.instance.as_ref()), (None, None));
        assert_eq!(b.args, ["1", "--x"]);
        assert_eq!(
            b.env,
            [
                ("A".to_owned(), "1".to_owned()),
                ("B".to_owned(), "2".to_owned())
            ]
        );
        assert_eq!(b.success_exit_codes, [0, -15]);
        assert_eq!(b.stop_signal, StopSignal::Int);
        assert_eq!(b.crash_loop.max_starts, 2);
        assert_eq!(b.instance.as_deref(), Some("wx-a"));
    }

    #[test]
    fn every_problem_is_located() {
        let found = errors(
            "  - {name: Bad Name, command: x}\n  - {name: a, command: ''}\n  - {name: a, command: x}\n  \
             - {name: c, command: x, restart: sometimes, stop_signal: TERMINATE, instance: wx-z}\n  \
             - {name: d, command: x, env: {A: null}, success_exit_codes: [x], crash_loop: {max_starts: 0}}\n  \
             - {name: e, command: x, backoff: {initial: 2s, max: 1s}, bogus: 1}\n  - {command: x}\n",
        );
        let expected = [
            "<builtin>:4:12: processes[0].name: invalid process name \"Bad Name\": use 1 to 64 characters from a-z 0-9 _ -",
            "<builtin>:5:24: processes[1].command: must not be empty",
            "<builtin>:6:12: processes[2].name: duplicate process name \"a\" (first defined at line 5)",
            "<builtin>:7:36: processes[3].restart: invalid restart \"sometimes\": expected never, on-failure or always",
            "<builtin>:7:60: processes[3].stop_signal: invalid stop_signal \"TERMINATE\": expected one of TERM, INT, HUP, QUIT, KILL, USR1, USR2",
            "<builtin>:7:81: processes[3].instance: unknown instance id \"wx-z\"",
        ];
        for line in expected {
            assert!(
                found.iter().any(|error| error == line),
                "missing {line}\nin {found:#?}"
            );
        }
        for fragment in [
            "processes[4].env.A: expected a string value, found null",
            "processes[4].success_exit_codes[0]: expected an integer",
            "processes[4].crash_loop.max_starts: must be between 1 and 10000, got 0",
            "processes[5].backoff: initial (2s) must not exceed max (1s)",
            "processes[5].bogus: unknown key \"bogus\"",
            "processes[6].name: missing required key",
        ] {
            assert!(
                found.iter().any(|error| error.contains(fragment)),
                "missing {fragment}\nin {found:#?}"
            );
        }
    }

    #[test]
    fn env_values_are_never_quoted_in_errors() {
        let found = errors("  - {name: a, command: x, env: {TOKEN: [secret-value-Zq9]}}\n");
        assert!(
            found
                .iter()
                .all(|error| !error.contains("secret-value-Zq9"))
        );
        assert!(
            found
                .iter()
                .any(|error| error.contains("processes[0].env.TOKEN"))
        );
    }
}
