//! `Content-Type` by file extension: `mime_guess`'s table, corrected where it is wrong
//! or dated for what GeoNature serves.

use std::path::Path;

/// Where `mime_guess` differs from what browsers and RFCs expect today.
const OVERRIDES: [(&str, &str); 5] = [
    // Source maps are JSON (mime_guess says text/plain, from the old image-map meaning).
    ("map", "application/json"),
    // RFC 9239: JavaScript is text/javascript, modules included.
    ("mjs", "text/javascript"),
    // RFC 8081.
    ("woff", "font/woff"),
    // The IANA type; image/x-icon is what mime_guess gives and browsers accept both.
    ("ico", "image/vnd.microsoft.icon"),
    // Angular builds ship this one; a sniffing-averse browser needs the right type.
    ("webmanifest", "application/manifest+json"),
];

/// Unknown extensions are opaque bytes: never guessed as something a browser runs.
const DEFAULT: &str = "application/octet-stream";

/// The media type of `path`, from its extension (case-insensitive).
pub fn content_type(path: &Path) -> String {
    let Some(ext) = path.extension().and_then(|e| e.to_str()) else {
        return DEFAULT.into();
    };
    let ext = ext.to_ascii_lowercase();
    if let Some((_, media)) = OVERRIDES.iter().find(|(e, _)| *e == ext) {
        return (*media).into();
    }
    mime_guess::from_ext(&ext)
        .first_raw()
        .unwrap_or(DEFAULT)
        .into()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_type_geonature_serves_is_right() {
        let expected = [
            ("main.js", "text/javascript"),
            ("styles.css", "text/css"),
            ("index.html", "text/html"),
            ("config.json", "application/json"),
            ("logo.svg", "image/svg+xml"),
            ("logo.png", "image/png"),
            ("photo.JPG", "image/jpeg"),
            ("font.woff2", "font/woff2"),
            ("favicon.ico", "image/vnd.microsoft.icon"),
            ("export.csv", "text/csv"),
            ("export.zip", "application/zip"),
            ("report.pdf", "application/pdf"),
            ("layer.geojson", "application/geo+json"),
            ("main.js.map", "application/json"),
            ("notes.txt", "text/plain"),
            ("manifest.webmanifest", "application/manifest+json"),
            ("noextension", "application/octet-stream"),
            ("x.unknownext", "application/octet-stream"),
        ];
        for (name, media) in expected {
            assert_eq!(content_type(Path::new(name)), media, "{name}");
        }
    }
}
