//! Kubernetes resource quantities: "500m", "2Gi", "1e3", "0.5". Parsed into an exact value in
//! milli-units so that requests and limits compare and add without floating point.

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Quantity {
    /// The value times 1000 (so "500m" is 500 and "2" is 2000).
    pub milli: i128,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("quantities must match the regular expression '^([+-]?[0-9.]+)([eEinumkKMGTP]*[-+]?[0-9]*)$'")]
pub struct QuantityError;

impl Quantity {
    pub fn parse(s: &str) -> Result<Quantity, QuantityError> {
        let s = s.trim();
        let split = s.find(|c: char| !(c.is_ascii_digit() || c == '.' || c == '+' || c == '-')).unwrap_or(s.len());
        let (num, suffix) = s.split_at(split);
        if num.is_empty() || num == "+" || num == "-" || num.matches('.').count() > 1 {
            return Err(QuantityError);
        }
        let negative = num.starts_with('-');
        let digits = num.trim_start_matches(['+', '-']);
        if digits.contains(['+', '-']) || digits.is_empty() || digits == "." {
            return Err(QuantityError);
        }
        let (int, frac) = digits.split_once('.').unwrap_or((digits, ""));
        // value = int.frac, as an exact fraction scaled by 10^frac.len()
        let scale = 10i128.checked_pow(frac.len() as u32).ok_or(QuantityError)?;
        let mantissa: i128 = format!("{int}{frac}").parse().map_err(|_| QuantityError)?;
        // (multiplier numerator, denominator) of the suffix, times 1000 for milli-units.
        let (num_mul, den_mul): (i128, i128) = match suffix {
            "" => (1000, 1),
            "m" => (1, 1),
            "k" => (1_000_000, 1),
            "M" => (1_000_000_000, 1),
            "G" => (1_000_000_000_000, 1),
            "T" => (1_000_000_000_000_000, 1),
            "P" => (1_000_000_000_000_000_000, 1),
            "E" => (1_000_000_000_000_000_000_000, 1),
            "Ki" => (1000 << 10, 1),
            "Mi" => (1000 << 20, 1),
            "Gi" => (1000 << 30, 1),
            "Ti" => (1000 << 40, 1),
            "Pi" => (1000 << 50, 1),
            "Ei" => (1000 << 60, 1),
            s if s.starts_with(['e', 'E']) => {
                let exp: i32 = s[1..].parse().map_err(|_| QuantityError)?;
                if !(-18..=18).contains(&exp) {
                    return Err(QuantityError);
                }
                if exp >= -3 {
                    (1000 * 10i128.pow((exp + 3) as u32) / 1000, 1)
                } else {
                    (1, 10i128.pow((-exp - 3) as u32))
                }
            }
            _ => return Err(QuantityError),
        };
        let value = mantissa.checked_mul(num_mul).ok_or(QuantityError)? / scale / den_mul;
        Ok(Quantity { milli: if negative { -value } else { value } })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantities_parse_like_kubernetes() {
        let q = |s: &str| Quantity::parse(s).map(|q| q.milli);
        assert_eq!(q("500m"), Ok(500));
        assert_eq!(q("0.5"), Ok(500));
        assert_eq!(q("1"), Ok(1000));
        assert_eq!(q("2Gi"), Ok(2 * 1000 * (1 << 30)));
        assert_eq!(q("128Mi"), Ok(128 * 1000 * (1 << 20)));
        assert_eq!(q("1k"), Ok(1_000_000));
        assert_eq!(q("1e3"), Ok(1_000_000));
        assert_eq!(q("1.5G"), Ok(1_500_000_000_000));
        assert!(Quantity::parse("2GB").is_err());
        assert!(Quantity::parse("abc").is_err());
        assert!(Quantity::parse("").is_err());
        assert!(Quantity::parse("1..2").is_err());
        assert!(Quantity::parse("Gi").is_err());
        assert!(Quantity::parse("500m").unwrap() < Quantity::parse("1").unwrap());
    }
}
