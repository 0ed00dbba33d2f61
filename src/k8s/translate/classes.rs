//! Class and ownership, the first stage of translation: which IngressClasses are ours,
//! and so which Ingresses are ours.

use k8s_openapi::api::networking::v1::Ingress;

use super::{DEFAULT_CLASS_ANNOTATION, FastMap, Inputs, LEGACY_CLASS_ANNOTATION, Options};

/// The IngressClasses a build knows, and whether one of ours is the cluster default.
pub(super) struct IngressClasses<'a> {
    /// Class name → (ours, its controller).
    classes: FastMap<&'a str, (bool, Option<&'a str>)>,
    default_ours: bool,
}

impl<'a> IngressClasses<'a> {
    /// Which IngressClasses are ours (by `spec.controller`), and whether one of ours is
    /// the default. With `options.assume_class` (file mode), a class `ingress_class`,
    /// ours and default, stands in when the inputs define none of ours.
    pub(super) fn new(inputs: &'a Inputs, options: &'a Options) -> Self {
        let mut classes: FastMap<&str, (bool, Option<&str>)> = FastMap::default();
        let mut default_ours = false;
        for class in &inputs.ingress_classes {
            let name = class.metadata.name.as_deref().unwrap_or_default();
            let controller = class.spec.as_ref().and_then(|s| s.controller.as_deref());
            let ours = controller == Some(options.controller_name.as_str());
            let is_default = class
                .metadata
                .annotations
                .as_ref()
                .and_then(|a| a.get(DEFAULT_CLASS_ANNOTATION))
                .is_some_and(|v| v == "true");
            default_ours |= ours && is_default;
            classes.insert(name, (ours, controller));
        }
        if options.assume_class
            && !classes.values().any(|(ours, _)| *ours)
            && !classes.contains_key(options.ingress_class.as_str())
        {
            classes.insert(options.ingress_class.as_str(), (true, None));
            default_ours = true;
        }
        IngressClasses {
            classes,
            default_ours,
        }
    }

    /// `Ok` when the Ingress is ours, else the reason it is ignored.
    pub(super) fn classify(&self, ing: &Ingress, options: &Options) -> Result<(), String> {
        let (classes, default_ours) = (&self.classes, self.default_ours);
        let class_name = ing
            .spec
            .as_ref()
            .and_then(|s| s.ingress_class_name.as_deref());
        if let Some(name) = class_name {
            return match classes.get(name) {
                Some((true, _)) => Ok(()),
                Some((false, controller)) => Err(format!(
                    "IngressClass {name} belongs to controller {}, not {}",
                    controller.unwrap_or("(none)"),
                    options.controller_name
                )),
                None => Err(format!("IngressClass {name} not found")),
            };
        }
        let annotation = ing
            .metadata
            .annotations
            .as_ref()
            .and_then(|a| a.get(LEGACY_CLASS_ANNOTATION));
        if let Some(value) = annotation {
            return if *value == options.ingress_class {
                Ok(())
            } else {
                Err(format!(
                    "annotation {LEGACY_CLASS_ANNOTATION}={value} is not {}",
                    options.ingress_class
                ))
            };
        }
        if default_ours || options.watch_without_class {
            Ok(())
        } else {
            Err("names no IngressClass, and no IngressClass of ours is the default".into())
        }
    }
}
