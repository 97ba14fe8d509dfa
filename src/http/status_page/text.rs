//! The status page's words in English and Chinese, and the language choice.

/// A page language.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lang {
    /// English.
    En,
    /// Simplified Chinese.
    Zh,
}

impl Lang {
    /// The `lang` attribute and the `?lang=` value.
    pub fn code(self) -> &'static str {
        match self {
            Self::En => "en",
            Self::Zh => "zh",
        }
    }

    /// The words of this language.
    pub fn text(self) -> &'static Text {
        match self {
            Self::En => &EN,
            Self::Zh => &ZH,
        }
    }

    fn from_code(code: &str) -> Option<Self> {
        let code = code.trim().to_ascii_lowercase();
        if code == "zh" || code.starts_with("zh-") {
            Some(Self::Zh)
        } else if code == "en" || code.starts_with("en-") {
            Some(Self::En)
        } else {
            None
        }
    }

    /// `?lang=` wins; else the `Accept-Language` range of highest weight that is English or
    /// Chinese; else English.
    pub fn negotiate(query: Option<&str>, accept_language: Option<&str>) -> Self {
        if let Some(lang) = query.and_then(Self::from_code) {
            return lang;
        }
        let mut best: Option<(f32, Self)> = None;
        for range in accept_language.unwrap_or("").split(',') {
            let mut parts = range.split(';');
            let Some(lang) = parts.next().and_then(Self::from_code) else {
                continue;
            };
            let weight = parts
                .find_map(|param| param.trim().strip_prefix("q="))
                .and_then(|q| q.trim().parse::<f32>().ok())
                .unwrap_or(1.0);
            if weight > 0.0 && best.is_none_or(|(top, _)| weight > top) {
                best = Some((weight, lang));
            }
        }
        best.map_or(Self::En, |(_, lang)| lang)
    }
}

/// Every word the page shows.
#[derive(Debug)]
pub struct Text {
    pub title: &'static str,
    pub other_language: &'static str,
    pub updated: &'static str,
    pub live: &'static str,
    pub refresh_failed: &'static str,
    pub health: &'static str,
    pub score: &'static str,
    pub healthy: &'static str,
    pub warning: &'static str,
    pub critical: &'static str,
    pub deductions: &'static str,
    pub deduction_listener: &'static str,
    pub deduction_clients: &'static str,
    pub deduction_listeners: &'static str,
    pub deduction_error_rate: &'static str,
    pub listener_running: &'static str,
    pub listener_stopped: &'static str,
    pub uptime: &'static str,
    pub instances: &'static str,
    pub connected: &'static str,
    pub instance: &'static str,
    pub state: &'static str,
    pub last_check: &'static str,
    pub errors: &'static str,
    pub chats_active_inactive: &'static str,
    pub last_error: &'static str,
    pub disabled: &'static str,
    pub state_unknown: &'static str,
    pub state_up: &'static str,
    pub state_down: &'static str,
    pub state_recovering: &'static str,
    pub no_instances: &'static str,
    pub chats: &'static str,
    pub chat: &'static str,
    pub active: &'static str,
    pub inactive: &'static str,
    pub fixed: &'static str,
    pub messages: &'static str,
    pub last_message: &'static str,
    pub no_chats: &'static str,
    pub delivery: &'static str,
    pub backlog: &'static str,
    pub retrying: &'static str,
    pub dead_letters: &'static str,
    pub delivered: &'static str,
    pub no_delivery: &'static str,
    pub recent_errors: &'static str,
    pub time: &'static str,
    pub kind: &'static str,
    pub message: &'static str,
    pub no_errors: &'static str,
    pub errors_in_window: &'static str,
    pub messages_in_window: &'static str,
    pub config: &'static str,
    pub last_reload: &'static str,
    pub reload_ok: &'static str,
    pub reload_failed: &'static str,
    pub loaded_at: &'static str,
    pub reloads: &'static str,
    pub config_hash: &'static str,
    pub lifecycle: &'static str,
    pub enabled: &'static str,
    pub lifecycle_disabled: &'static str,
    pub processes: &'static str,
    pub process: &'static str,
    pub restarts: &'static str,
    pub exit_code: &'static str,
    pub memory: &'static str,
    pub endpoints: &'static str,
    pub never: &'static str,
}

/// English.
pub static EN: Text = Text {
    title: "wxauto-sidecar status",
    other_language: "中文",
    updated: "Updated",
    live: "Refreshing every 5 s",
    refresh_failed: "Refresh failed; showing the last answer",
    health: "Health",
    score: "Health score",
    healthy: "Healthy",
    warning: "Warning",
    critical: "Critical",
    deductions: "Points lost",
    deduction_listener: "Listener service",
    deduction_clients: "Disconnected instances",
    deduction_listeners: "Inactive chats",
    deduction_error_rate: "Error rate",
    listener_running: "Listener running",
    listener_stopped: "Listener stopped",
    uptime: "Uptime",
    instances: "Instances",
    connected: "connected",
    instance: "Instance",
    state: "State",
    last_check: "Last check",
    errors: "Errors",
    chats_active_inactive: "Chats active / inactive",
    last_error: "Last error",
    disabled: "disabled",
    state_unknown: "unknown",
    state_up: "up",
    state_down: "down",
    state_recovering: "recovering",
    no_instances: "No instances configured.",
    chats: "Listened chats",
    chat: "Chat",
    active: "active",
    inactive: "inactive",
    fixed: "fixed",
    messages: "Messages",
    last_message: "Last message",
    no_chats: "No chats yet.",
    delivery: "Delivery",
    backlog: "Backlog (pending)",
    retrying: "of which retrying",
    dead_letters: "Dead letters",
    delivered: "Delivered",
    no_delivery: "Delivery is not running in this process.",
    recent_errors: "Recent errors",
    time: "Time",
    kind: "Kind",
    message: "Message",
    no_errors: "No errors recorded.",
    errors_in_window: "Errors in window",
    messages_in_window: "Messages in window",
    config: "Configuration",
    last_reload: "Last reload",
    reload_ok: "successful",
    reload_failed: "failed (the previous configuration stays active)",
    loaded_at: "Loaded at",
    reloads: "Reloads / failures",
    config_hash: "Config hash",
    lifecycle: "Lifecycle endpoints",
    enabled: "enabled",
    lifecycle_disabled: "disabled",
    processes: "Supervised processes",
    process: "Process",
    restarts: "Restarts",
    exit_code: "Last exit code",
    memory: "Memory",
    endpoints: "Endpoints",
    never: "never",
};

/// Simplified Chinese.
pub static ZH: Text = Text {
    title: "wxauto-sidecar 状态",
    other_language: "English",
    updated: "更新于",
    live: "每 5 秒自动刷新",
    refresh_failed: "刷新失败，显示上一次的结果",
    health: "健康状况",
    score: "健康分",
    healthy: "健康",
    warning: "警告",
    critical: "严重",
    deductions: "扣分",
    deduction_listener: "监听服务",
    deduction_clients: "断开的实例",
    deduction_listeners: "不活跃的聊天",
    deduction_error_rate: "错误率",
    listener_running: "监听服务运行中",
    listener_stopped: "监听服务已停止",
    uptime: "运行时间",
    instances: "实例",
    connected: "已连接",
    instance: "实例",
    state: "状态",
    last_check: "上次检查",
    errors: "错误",
    chats_active_inactive: "聊天 活跃 / 不活跃",
    last_error: "最近错误",
    disabled: "已停用",
    state_unknown: "未知",
    state_up: "在线",
    state_down: "离线",
    state_recovering: "恢复中",
    no_instances: "未配置实例。",
    chats: "监听的聊天",
    chat: "聊天",
    active: "活跃",
    inactive: "不活跃",
    fixed: "固定",
    messages: "消息数",
    last_message: "最后消息",
    no_chats: "暂无聊天。",
    delivery: "投递",
    backlog: "待投递",
    retrying: "其中重试中",
    dead_letters: "死信",
    delivered: "已投递",
    no_delivery: "本进程未运行投递。",
    recent_errors: "最近错误",
    time: "时间",
    kind: "类型",
    message: "内容",
    no_errors: "没有错误记录。",
    errors_in_window: "窗口内错误",
    messages_in_window: "窗口内消息",
    config: "配置",
    last_reload: "上次重载",
    reload_ok: "成功",
    reload_failed: "失败（继续使用之前的配置）",
    loaded_at: "加载时间",
    reloads: "重载 / 失败",
    config_hash: "配置哈希",
    lifecycle: "生命周期接口",
    enabled: "已启用",
    lifecycle_disabled: "未启用",
    processes: "托管进程",
    process: "进程",
    restarts: "重启次数",
    exit_code: "上次退出码",
    memory: "内存",
    endpoints: "接口",
    never: "从未",
};

#[cfg(test)]
mod tests {
    use super::Lang;

    #[test]
    fn the_query_wins_then_the_heaviest_known_language() {
        assert_eq!(Lang::negotiate(Some("zh"), Some("en-US")), Lang::Zh);
        assert_eq!(
            Lang::negotiate(Some("xx"), Some("zh-CN,zh;q=0.9")),
            Lang::Zh
        );
        assert_eq!(
            Lang::negotiate(None, Some("fr-FR,en;q=0.5,zh-CN;q=0.8")),
            Lang::Zh
        );
        assert_eq!(Lang::negotiate(None, Some("en-GB,zh;q=0.3")), Lang::En);
        assert_eq!(Lang::negotiate(None, Some("zh;q=0")), Lang::En);
        assert_eq!(Lang::negotiate(None, None), Lang::En);
    }
}
