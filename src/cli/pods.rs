//! `keelctl logs` and `keelctl exec`, through any replica to the pod's node.

use std::io::Write;

use tokio::io::AsyncReadExt;

use super::args::{ExecArgs, LogsArgs};
use super::{bail, CliError, Result, Session};
use crate::proto::v1 as pb;

/// `NAME` or `pod/NAME`.
fn pod_name(arg: &str) -> Result<String> {
    match arg.split_once('/') {
        None => Ok(arg.to_string()),
        Some(("pod" | "pods" | "po", n)) if !n.is_empty() => Ok(n.to_string()),
        Some((kind, _)) => bail!("error: {kind} is not a pod; give POD or pod/POD"),
    }
}

pub async fn logs(s: &Session, a: LogsArgs) -> Result<()> {
    let req = pb::LogsRequest {
        namespace: s.namespace.clone(),
        pod: pod_name(&a.pod)?,
        container: a.container.unwrap_or_default(),
        follow: a.follow,
        previous: a.previous,
        tail_lines: (a.tail >= 0).then_some(a.tail),
        since_seconds: a.since.map(|d| d.as_secs().max(1) as i64),
        timestamps: a.timestamps,
        limit_bytes: a.limit_bytes,
    };
    let mut stream = s.client.logs(req).await?;
    let mut out = std::io::stdout();
    while let Some(chunk) = stream
        .message()
        .await
        .map_err(|st| CliError::Message(format!("Error from server ({:?}): {}", st.code(), st.message())))?
    {
        out.write_all(&chunk.data).map_err(|e| CliError::Message(format!("stdout: {e}")))?;
        out.flush().map_err(|e| CliError::Message(format!("stdout: {e}")))?;
    }
    Ok(())
}

/// The terminal's size (columns, rows), if stdin is a terminal.
fn terminal_size() -> Option<pb::TerminalSize> {
    let mut ws = libc::winsize { ws_row: 0, ws_col: 0, ws_xpixel: 0, ws_ypixel: 0 };
    // SAFETY: TIOCGWINSZ fills the winsize it is given.
    let ok = unsafe { libc::ioctl(0, libc::TIOCGWINSZ, &mut ws) } == 0;
    (ok && ws.ws_col > 0).then(|| pb::TerminalSize { width: u32::from(ws.ws_col), height: u32::from(ws.ws_row) })
}

/// Puts the terminal on stdin in raw mode until dropped.
struct RawMode(Option<nix::sys::termios::Termios>);

impl RawMode {
    fn enter() -> RawMode {
        let stdin = std::io::stdin();
        match nix::sys::termios::tcgetattr(&stdin) {
            Ok(saved) => {
                let mut raw = saved.clone();
                nix::sys::termios::cfmakeraw(&mut raw);
                let _ = nix::sys::termios::tcsetattr(&stdin, nix::sys::termios::SetArg::TCSANOW, &raw);
                RawMode(Some(saved))
            }
            Err(_) => RawMode(None),
        }
    }
}

impl Drop for RawMode {
    fn drop(&mut self) {
        if let Some(saved) = &self.0 {
            let _ = nix::sys::termios::tcsetattr(std::io::stdin(), nix::sys::termios::SetArg::TCSANOW, saved);
        }
    }
}

pub async fn exec(s: &Session, a: ExecArgs) -> Result<()> {
    use pb::exec_input::Input;
    use pb::exec_output::Output;
    let size = if a.tty { terminal_size() } else { None };
    let start = pb::ExecStart {
        namespace: s.namespace.clone(),
        pod: pod_name(&a.pod)?,
        container: a.container.clone().unwrap_or_default(),
        command: a.command.clone(),
        stdin: a.stdin,
        tty: a.tty,
        size,
    };
    let (tx, rx) = tokio::sync::mpsc::channel::<pb::ExecInput>(16);
    tx.send(pb::ExecInput { input: Some(Input::Start(start)) })
        .await
        .map_err(|_| CliError::Message("exec: closed".into()))?;
    let mut tasks = Vec::new();
    if a.stdin {
        let tx = tx.clone();
        tasks.push(tokio::spawn(async move {
            let mut stdin = tokio::io::stdin();
            let mut buf = vec![0u8; 16 << 10];
            loop {
                match stdin.read(&mut buf).await {
                    Ok(0) | Err(_) => {
                        let _ = tx.send(pb::ExecInput { input: Some(Input::CloseStdin(true)) }).await;
                        return;
                    }
                    Ok(n) => {
                        if tx.send(pb::ExecInput { input: Some(Input::Stdin(buf[..n].to_vec())) }).await.is_err() {
                            return;
                        }
                    }
                }
            }
        }));
    }
    if a.tty {
        let tx = tx.clone();
        tasks.push(tokio::spawn(async move {
            let Ok(mut winch) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::window_change()) else {
                return;
            };
            while winch.recv().await.is_some() {
                if let Some(size) = terminal_size() {
                    if tx.send(pb::ExecInput { input: Some(Input::Resize(size)) }).await.is_err() {
                        return;
                    }
                }
            }
        }));
    }
    // Without stdin the command's input ends at once; the stream stays open for resizes.
    if !a.stdin {
        let _ = tx.send(pb::ExecInput { input: Some(Input::CloseStdin(true)) }).await;
    }
    drop(tx);
    let raw = if a.tty && a.stdin { Some(RawMode::enter()) } else { None };
    let result = async {
        let mut stream = s.client.exec(tokio_stream::wrappers::ReceiverStream::new(rx)).await?;
        let (mut out, mut err) = (std::io::stdout(), std::io::stderr());
        let mut code = None;
        while let Some(msg) = stream
            .message()
            .await
            .map_err(|st| CliError::Message(format!("Error from server ({:?}): {}", st.code(), st.message())))?
        {
            match msg.output {
                Some(Output::Stdout(d)) => {
                    let _ = out.write_all(&d);
                    let _ = out.flush();
                }
                Some(Output::Stderr(d)) => {
                    let _ = err.write_all(&d);
                    let _ = err.flush();
                }
                Some(Output::ExitCode(c)) => code = Some(c),
                None => {}
            }
        }
        Ok::<_, CliError>(code)
    }
    .await;
    drop(raw);
    for t in tasks {
        t.abort();
    }
    match result? {
        Some(0) => Ok(()),
        Some(c) => Err(CliError::Exit(c)),
        None => bail!("error: the exec ended without an exit code"),
    }
}
