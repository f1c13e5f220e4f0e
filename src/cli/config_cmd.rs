//! `keelctl config`: contexts in the configuration file (view, get-contexts,
//! current-context, use-context, set-context, delete-context).

use super::args::ConfigCommand;
use super::{bail, Context as _, Result};
use crate::client::config;

/// Runs a config command; it needs no cluster.
pub fn run(c: ConfigCommand) -> Result<()> {
    let path = config::path();
    let mut cfg = config::Config::load(&path)?;
    match c {
        ConfigCommand::View { raw } => {
            let mut shown = config::Config::load(&config::read_path())?;
            if !raw {
                for c in &mut shown.contexts {
                    for f in [&mut c.certificate_authority_data, &mut c.client_certificate_data, &mut c.client_key_data]
                    {
                        if !f.is_empty() {
                            *f = "DATA+OMITTED".into();
                        }
                    }
                }
            }
            println!("{}", shown.to_yaml()?.trim_end());
        }
        ConfigCommand::GetContexts => {
            println!("{:<8} {:<20} {:<16} SERVERS", "CURRENT", "NAME", "NAMESPACE");
            for ctx in &cfg.contexts {
                let star = if ctx.name == cfg.current_context { "*" } else { "" };
                println!("{star:<8} {:<20} {:<16} {}", ctx.name, ctx.namespace, ctx.servers.join(","));
            }
        }
        ConfigCommand::CurrentContext => {
            if cfg.current_context.is_empty() {
                bail!("current-context is not set");
            }
            println!("{}", cfg.current_context);
        }
        ConfigCommand::UseContext { name } => {
            cfg.use_context(&name)?;
            cfg.save(&path)?;
            println!("Switched to context {name:?}.");
        }
        ConfigCommand::SetContext {
            name,
            servers,
            default_namespace,
            certificate_authority,
            client_certificate,
            client_key,
        } => {
            let existed = cfg.context(&name).is_some();
            let inherited = if existed { None } else { cfg.selected(None).ok().flatten().cloned() };
            cfg.set_context(&name, servers, default_namespace);
            let read =
                |p: &std::path::Path| std::fs::read_to_string(p).with_context(|| format!("read {}", p.display()));
            let ctx = cfg.contexts.iter_mut().find(|c| c.name == name).context("context just set")?;
            if let Some(from) = inherited {
                ctx.certificate_authority_data = from.certificate_authority_data;
                ctx.client_certificate_data = from.client_certificate_data;
                ctx.client_key_data = from.client_key_data;
            }
            if let Some(p) = certificate_authority {
                ctx.certificate_authority_data = read(&p)?;
            }
            if let Some(p) = client_certificate {
                ctx.client_certificate_data = read(&p)?;
            }
            if let Some(p) = client_key {
                ctx.client_key_data = read(&p)?;
            }
            cfg.save(&path)?;
            println!("Context {name:?} {}.", if existed { "modified" } else { "created" });
        }
        ConfigCommand::DeleteContext { name } => {
            cfg.delete_context(&name)?;
            cfg.save(&path)?;
            println!("deleted context {name} from {}", path.display());
        }
    }
    Ok(())
}
