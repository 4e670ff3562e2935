//! The two units an operator writes by hand: durations ("90s", "30m", "none") and
//! sizes ("1GiB", "500MB").
//!
//! Both parse during deserialisation, so a bad value is reported by `toml` with the
//! exact line and column of the offending string.

use std::fmt;
use std::time::Duration;

use serde::de::{self, Deserialize, Deserializer};

/// A timer setting: a duration, or `none` to disable the timer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timer(pub Option<Duration>);

impl Timer {
    pub const DISABLED: Timer = Timer(None);

    pub fn secs(secs: u64) -> Self {
        Timer(Some(Duration::from_secs(secs)))
    }

    pub fn parse(text: &str) -> Result<Self, String> {
        let text = text.trim();
        if text.eq_ignore_ascii_case("none") || text.eq_ignore_ascii_case("off") {
            return Ok(Timer(None));
        }
        match humantime::parse_duration(text) {
            Ok(d) if d.is_zero() => Err(format!(
                "duration `{text}` is zero; write \"none\" to disable a timer"
            )),
            Ok(d) => Ok(Timer(Some(d))),
            Err(e) => Err(format!(
                "invalid duration `{text}` ({e}); write it like \"90s\", \"30m\", \"1h 30m\" or \"none\""
            )),
        }
    }
}

impl fmt::Display for Timer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            None => f.write_str("none"),
            Some(d) => write!(f, "{}", humantime::format_duration(d)),
        }
    }
}

impl<'de> Deserialize<'de> for Timer {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        Timer::parse(&text).map_err(de::Error::custom)
    }
}

/// A duration that must be set (no `none`), such as the shutdown grace.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RequiredDuration(pub Duration);

impl<'de> Deserialize<'de> for RequiredDuration {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        match Timer::parse(&text).map_err(de::Error::custom)? {
            Timer(Some(d)) => Ok(RequiredDuration(d)),
            Timer(None) => Err(de::Error::custom("this duration cannot be \"none\"")),
        }
    }
}

/// A byte count, or `none` for no limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Size(pub Option<u64>);

const UNITS: &[(&str, u64)] = &[
    ("kib", 1 << 10),
    ("mib", 1 << 20),
    ("gib", 1 << 30),
    ("tib", 1 << 40),
    ("kb", 1_000),
    ("mb", 1_000_000),
    ("gb", 1_000_000_000),
    ("tb", 1_000_000_000_000),
    ("k", 1 << 10),
    ("m", 1 << 20),
    ("g", 1 << 30),
    ("b", 1),
];

impl Size {
    pub fn parse(text: &str) -> Result<Self, String> {
        let trimmed = text.trim();
        if trimmed.eq_ignore_ascii_case("none") || trimmed.eq_ignore_ascii_case("unlimited") {
            return Ok(Size(None));
        }
        let digits_end = trimmed
            .find(|c: char| !c.is_ascii_digit())
            .unwrap_or(trimmed.len());
        let (number, unit) = trimmed.split_at(digits_end);
        let unit = unit.trim().to_ascii_lowercase();
        let invalid = || {
            format!("invalid size `{trimmed}`; write it like \"1GiB\", \"500MB\", \"64KiB\" or \"none\"")
        };
        let number: u64 = number.parse().map_err(|_| invalid())?;
        let factor = if unit.is_empty() {
            1
        } else {
            UNITS
                .iter()
                .find(|(name, _)| *name == unit)
                .map(|(_, f)| *f)
                .ok_or_else(invalid)?
        };
        number
            .checked_mul(factor)
            .map(|n| Size(Some(n)))
            .ok_or_else(|| format!("size `{trimmed}` is too large"))
    }
}

impl fmt::Display for Size {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            None => f.write_str("none"),
            Some(n) => f.write_str(&human_bytes(n)),
        }
    }
}

/// Renders a byte count the way an operator would write it in the config.
pub fn human_bytes(n: u64) -> String {
    for (name, factor) in [("GiB", 1u64 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)] {
        if n >= factor && n % factor == 0 {
            return format!("{}{name}", n / factor);
        }
    }
    if n >= 1_000_000 && n % 1_000_000 == 0 {
        return format!("{}MB", n / 1_000_000);
    }
    format!("{n}B")
}

impl<'de> Deserialize<'de> for Size {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        Size::parse(&text).map_err(de::Error::custom)
    }
}

/// An address range like `10.0.0.0/8` or `2001:db8::/32`; a bare address is a /32 or /128.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    network: std::net::IpAddr,
    prefix: u8,
}

impl Cidr {
    pub fn parse(text: &str) -> Result<Cidr, String> {
        let text = text.trim();
        let invalid = || {
            format!("invalid address or range `{text}`; write it like \"192.0.2.7\", \"10.0.0.0/8\" or \"::1\"")
        };
        let (address, prefix) = match text.split_once('/') {
            Some((a, p)) => (a, Some(p.parse::<u8>().map_err(|_| invalid())?)),
            None => (text, None),
        };
        let network: std::net::IpAddr = address.parse().map_err(|_| invalid())?;
        let max = if network.is_ipv4() { 32 } else { 128 };
        let prefix = prefix.unwrap_or(max);
        if prefix > max {
            return Err(invalid());
        }
        Ok(Cidr { network, prefix })
    }

    /// Whether `ip` is in the range; IPv4 clients seen through a dual-stack socket
    /// (`::ffff:a.b.c.d`) count as their IPv4 address.
    pub fn contains(&self, ip: std::net::IpAddr) -> bool {
        use std::net::IpAddr;
        match (self.network, ip.to_canonical()) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                let mask = u32::MAX
                    .checked_shl(32 - u32::from(self.prefix))
                    .unwrap_or(0);
                u32::from(net) & mask == u32::from(ip) & mask
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                let mask = u128::MAX
                    .checked_shl(128 - u32::from(self.prefix))
                    .unwrap_or(0);
                u128::from(net) & mask == u128::from(ip) & mask
            }
            _ => false,
        }
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.network, self.prefix)
    }
}

/// A request rate like `10/m`: at most `requests` per `per`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rate {
    pub requests: u32,
    pub per: Duration,
}

impl Rate {
    pub fn parse(text: &str) -> Result<Rate, String> {
        let invalid =
            || format!("invalid rate `{text}`; write it like \"10/m\", \"2/s\" or \"100/h\"");
        let (count, unit) = text.trim().split_once('/').ok_or_else(invalid)?;
        let requests: u32 = count.trim().parse().map_err(|_| invalid())?;
        let per = match unit.trim() {
            "s" | "sec" | "second" => Duration::from_secs(1),
            "m" | "min" | "minute" => Duration::from_secs(60),
            "h" | "hour" => Duration::from_secs(3600),
            _ => return Err(invalid()),
        };
        if requests == 0 {
            return Err(invalid());
        }
        Ok(Rate { requests, per })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cidr_ranges_match_v4_v6_and_mapped_addresses() {
        let lan = Cidr::parse("10.0.0.0/8").unwrap();
        assert!(lan.contains("10.200.3.4".parse().unwrap()));
        assert!(!lan.contains("11.0.0.1".parse().unwrap()));
        assert!(lan.contains("::ffff:10.1.2.3".parse().unwrap()));
        let one = Cidr::parse("192.0.2.7").unwrap();
        assert!(one.contains("192.0.2.7".parse().unwrap()));
        assert!(!one.contains("192.0.2.8".parse().unwrap()));
        let v6 = Cidr::parse("2001:db8::/32").unwrap();
        assert!(v6.contains("2001:db8:1::5".parse().unwrap()));
        assert!(!v6.contains("2001:db9::1".parse().unwrap()));
        assert!(Cidr::parse("0.0.0.0/0")
            .unwrap()
            .contains("203.0.113.9".parse().unwrap()));
        assert!(Cidr::parse("10.0.0.0/33").is_err());
        assert!(Cidr::parse("localhost").is_err());
    }

    #[test]
    fn rates_accept_per_second_minute_hour() {
        assert_eq!(
            Rate::parse("10/m").unwrap(),
            Rate {
                requests: 10,
                per: Duration::from_secs(60)
            }
        );
        assert_eq!(Rate::parse("2/s").unwrap().per, Duration::from_secs(1));
        assert!(Rate::parse("0/s").is_err());
        assert!(Rate::parse("10").is_err());
    }

    #[test]
    fn durations_accept_humantime_and_none() {
        assert_eq!(Timer::parse("90s").unwrap(), Timer::secs(90));
        assert_eq!(Timer::parse("30m").unwrap(), Timer::secs(1800));
        assert_eq!(Timer::parse("1h 30m").unwrap(), Timer::secs(5400));
        assert_eq!(Timer::parse("none").unwrap(), Timer::DISABLED);
        assert!(Timer::parse("0s").is_err());
        assert!(Timer::parse("ten minutes").is_err());
    }

    #[test]
    fn sizes_accept_binary_and_decimal_units() {
        assert_eq!(Size::parse("1GiB").unwrap(), Size(Some(1 << 30)));
        assert_eq!(Size::parse("500MB").unwrap(), Size(Some(500_000_000)));
        assert_eq!(Size::parse("64 KiB").unwrap(), Size(Some(65536)));
        assert_eq!(Size::parse("1024").unwrap(), Size(Some(1024)));
        assert_eq!(Size::parse("none").unwrap(), Size(None));
        assert!(Size::parse("1 potato").is_err());
        assert!(Size::parse("GiB").is_err());
        assert!(Size::parse("99999999999TiB").is_err());
    }

    #[test]
    fn sizes_render_as_written() {
        assert_eq!(human_bytes(1 << 30), "1GiB");
        assert_eq!(human_bytes(500_000_000), "500MB");
        assert_eq!(human_bytes(1000), "1000B");
    }
}
