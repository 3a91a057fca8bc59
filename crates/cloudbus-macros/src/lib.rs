//! `#[derive(CloudEvent)]`: makes a serde type an application event of cloudbus, with
//! its CloudEvents `type`, version, `source`, `dataschema`, and optionally the fields
//! that give its ordering key and subject. The trait it implements, and the docs, are
//! `cloudbus::CloudEvent` (re-exported with this derive by the `cloudbus` crate).
//!
//! ```ignore
//! #[derive(serde::Serialize, serde::Deserialize, cloudbus::CloudEvent)]
//! #[cloudevent(type = "com.example.order.created", version = 2, source = "/orders")]
//! struct OrderCreated {
//!     #[cloudevent(subject)]
//!     order_id: String,
//!     #[cloudevent(key)]
//!     customer: String,
//! }
//! ```
//!
//! Container attributes: `type` (required), `version` (default 1), `source` (default
//! `/` and the crate's package name), `schema` (the `dataschema` URI; default
//! `urn:cloudbus:schema:TYPE:vVERSION`), `crate` (the path of the cloudbus crate;
//! default `::cloudbus`). Field attributes: `key` (the ordering key), `subject`.

use proc_macro::TokenStream;
use quote::quote;
use syn::{Data, DeriveInput, Expr, ExprLit, Fields, Lit, LitStr, Path, parse_macro_input};

/// Derives `cloudbus::CloudEvent`; see the crate documentation for the attributes.
#[proc_macro_derive(CloudEvent, attributes(cloudevent))]
pub fn derive_cloud_event(input: TokenStream) -> TokenStream {
    let input = parse_macro_input!(input as DeriveInput);
    match expand(&input) {
        Ok(tokens) => tokens.into(),
        Err(e) => e.to_compile_error().into(),
    }
}

/// The container attributes, as written.
#[derive(Default)]
struct Container {
    ty: Option<LitStr>,
    version: Option<u32>,
    source: Option<LitStr>,
    schema: Option<LitStr>,
    krate: Option<Path>,
}

fn expand(input: &DeriveInput) -> syn::Result<proc_macro2::TokenStream> {
    let mut attrs = Container::default();
    for attr in input
        .attrs
        .iter()
        .filter(|a| a.path().is_ident("cloudevent"))
    {
        attr.parse_nested_meta(|meta| {
            let value = || -> syn::Result<Expr> { meta.value()?.parse() };
            if meta.path.is_ident("type") {
                attrs.ty = Some(lit_str(value()?)?);
            } else if meta.path.is_ident("version") {
                attrs.version = Some(lit_u32(value()?)?);
            } else if meta.path.is_ident("source") {
                attrs.source = Some(lit_str(value()?)?);
            } else if meta.path.is_ident("schema") {
                attrs.schema = Some(lit_str(value()?)?);
            } else if meta.path.is_ident("crate") {
                attrs.krate = Some(lit_str(value()?)?.parse()?);
            } else {
                return Err(meta.error(
                    "unknown cloudevent attribute; expected type, version, source, schema or crate",
                ));
            }
            Ok(())
        })?;
    }
    let Some(ty) = attrs.ty else {
        return Err(syn::Error::new_spanned(
            &input.ident,
            "#[derive(CloudEvent)] needs #[cloudevent(type = \"com.example.thing.happened\")]",
        ));
    };
    if ty.value().trim().is_empty() {
        return Err(syn::Error::new_spanned(
            &ty,
            "the event type must not be empty",
        ));
    }
    let version = attrs.version.unwrap_or(1);
    if version == 0 {
        return Err(syn::Error::new_spanned(&input.ident, "versions start at 1"));
    }
    let krate = attrs.krate.unwrap_or_else(|| syn::parse_quote!(::cloudbus));
    let source = match attrs.source {
        Some(s) => quote!(#s),
        None => quote!(::core::concat!("/", ::core::env!("CARGO_PKG_NAME"))),
    };
    let schema = attrs.schema.map(|s| {
        quote! {
            fn data_schema() -> ::std::string::String { ::std::string::String::from(#s) }
        }
    });
    let (key, subject) = marked_fields(input)?;
    let key = key.map(|f| {
        quote! {
            fn partition_key(&self) -> ::core::option::Option<::std::string::String> {
                ::core::option::Option::Some(::std::string::ToString::to_string(&self.#f))
            }
        }
    });
    let subject = subject.map(|f| {
        quote! {
            fn subject(&self) -> ::core::option::Option<::std::string::String> {
                ::core::option::Option::Some(::std::string::ToString::to_string(&self.#f))
            }
        }
    });
    let name = &input.ident;
    let (impl_generics, ty_generics, where_clause) = input.generics.split_for_impl();
    Ok(quote! {
        impl #impl_generics #krate::CloudEvent for #name #ty_generics #where_clause {
            const TYPE: &'static str = #ty;
            const VERSION: u32 = #version;
            const SOURCE: &'static str = #source;
            #schema
            #key
            #subject
        }
    })
}

/// The fields marked `#[cloudevent(key)]` and `#[cloudevent(subject)]`.
fn marked_fields(input: &DeriveInput) -> syn::Result<(Option<syn::Member>, Option<syn::Member>)> {
    let (mut key, mut subject) = (None, None);
    let fields = match &input.data {
        Data::Struct(s) => match &s.fields {
            Fields::Named(f) => f.named.iter().collect::<Vec<_>>(),
            Fields::Unnamed(f) => f.unnamed.iter().collect(),
            Fields::Unit => Vec::new(),
        },
        _ => Vec::new(),
    };
    for (index, field) in fields.into_iter().enumerate() {
        let member = match &field.ident {
            Some(ident) => syn::Member::Named(ident.clone()),
            None => syn::Member::Unnamed(index.into()),
        };
        for attr in field
            .attrs
            .iter()
            .filter(|a| a.path().is_ident("cloudevent"))
        {
            attr.parse_nested_meta(|meta| {
                let slot = if meta.path.is_ident("key") {
                    &mut key
                } else if meta.path.is_ident("subject") {
                    &mut subject
                } else {
                    return Err(meta.error("unknown field attribute; expected key or subject"));
                };
                if slot.is_some() {
                    return Err(meta.error("only one field can be marked so"));
                }
                *slot = Some(member.clone());
                Ok(())
            })?;
        }
    }
    Ok((key, subject))
}

fn lit_str(expr: Expr) -> syn::Result<LitStr> {
    match expr {
        Expr::Lit(ExprLit {
            lit: Lit::Str(s), ..
        }) => Ok(s),
        other => Err(syn::Error::new_spanned(other, "expected a string literal")),
    }
}

fn lit_u32(expr: Expr) -> syn::Result<u32> {
    match expr {
        Expr::Lit(ExprLit {
            lit: Lit::Int(n), ..
        }) => n.base10_parse(),
        other => Err(syn::Error::new_spanned(other, "expected an integer")),
    }
}
